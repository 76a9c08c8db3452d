"""What the Triton backends share: whether the interpreter is on, and Triton's dtype names."""
import os

import torch

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set (to anything but "" or "0"): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
