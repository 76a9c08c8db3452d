"""Triton kernels of chunkmem (``@triton.jit`` code only), installed as ``chunkmem.kernels``."""
