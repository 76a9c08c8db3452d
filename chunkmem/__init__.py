"""chunkmem: hybrid global + chunked + gated-memory attention."""
from chunkmem.ops import gated_memory_update, hybrid_attention

__version__ = "0.1.0"
__all__ = ["hybrid_attention", "gated_memory_update", "__version__"]
