"""The backend table: one implementation per backend name, for each op.

The Triton modules are imported on first use, so the package imports without a GPU or Triton.
"""
from chunkmem import reference, torch_backend


def triton_attention_module():
    """chunkmem.triton_attention (hybrid_attention_triton, unsupported_reason), imported on first use."""
    from chunkmem import triton_attention

    return triton_attention


def triton_memory_module():
    """chunkmem.triton_memory (gated_memory_update_triton, unsupported_reason), imported on first use."""
    from chunkmem import triton_memory

    return triton_memory


def attention_backend(name: str):
    """The hybrid attention function of backend ``name`` ("reference", "torch" or "triton")."""
    if name == "reference":
        return reference.hybrid_attention_reference
    if name == "torch":
        return torch_backend.hybrid_attention_torch
    return triton_attention_module().hybrid_attention_triton


def memory_update_backend(name: str):
    """The gated memory update function of backend ``name`` ("reference", "torch" or "triton")."""
    if name == "reference":
        return reference.gated_memory_update_reference
    if name == "torch":
        return torch_backend.gated_memory_update_torch
    return triton_memory_module().gated_memory_update_triton
