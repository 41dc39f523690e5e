"""Test configuration. Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter, which must be
switched on before triton (and so lisa_kernels) is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
