"""Where the kernel tests can run Triton, defined once for every kernel test module.

CPU CI runs the Triton kernels under ``TRITON_INTERPRET=1`` (fp32/fp16: the interpreter has no bf16);
without it they need CUDA. ``@pytest.mark.gpu`` tests need CUDA either way.
"""

from __future__ import annotations

import pytest
import torch
from lowrank_kernels.utils import HAS_TRITON, interpreting

INTERPRET = interpreting()
CUDA = torch.cuda.is_available()
# The Triton path runs on CUDA, or on the CPU through the interpreter.
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and (INTERPRET or CUDA)),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (CI: TRITON_INTERPRET=1 python -m pytest)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
