import os

import torch

# Without a GPU the Triton kernels run through the interpreter on CPU tensors; it must be on
# before any module with @triton.jit is imported. On a GPU the compiled kernels are timed.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
