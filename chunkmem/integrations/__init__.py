"""Integrations of chunkmem's op with other libraries (imported on demand, never by ``chunkmem``).

- :mod:`chunkmem.integrations.transformers`: ``register()`` makes ``hybrid_attention`` an
  attention implementation of Hugging Face ``transformers`` (``attn_implementation="chunkmem"``).
"""
