"""Test-session setup shared by every test file.

On a machine without a CUDA device the Triton kernels run in Triton's CPU interpreter:
``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported, which is why it
is set here, before any test module imports the kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
