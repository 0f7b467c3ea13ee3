"""Where the kernel tests can run Triton, defined once for every kernel test module.

CPU CI runs the Triton kernels under ``TRITON_INTERPRET=1`` (fp32/fp16: the interpreter has no bf16);
without it they need CUDA. ``@pytest.mark.gpu`` tests need CUDA either way.
"""

from __future__ import annotations

import itertools

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

# (dtype, atol, rtol) of the kernels' accuracy tests: fp32 and fp16 everywhere, bf16 on a GPU only (the
# interpreter has none). atol covers outputs near zero, where a relative bound says nothing.
KERNEL_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 1e-3)]
if CUDA and not INTERPRET:
    KERNEL_DTYPES.append((torch.bfloat16, 1e-2, 1e-2))

_draws = itertools.count(1000)


def fresh_generator() -> torch.Generator:
    """A CPU generator with a new seed at every call, so no two checks share inputs."""
    return torch.Generator().manual_seed(next(_draws))


def assert_within_torch_error(out: torch.Tensor, ref: torch.Tensor, own: torch.Tensor, atol: float,
                              rtol: float) -> None:
    """The house bound: every element of `out` written (no NaN from a NaN-filled buffer), and its error
    against the fp64 reference `ref` within 2x torch's own error (`own`, the same math in the same dtype)
    plus atol + rtol·|ref|."""
    assert not out.isnan().any(), "an output element was not written"
    err = (out.double() - ref).abs()
    own_err = (own.double() - ref).abs().max().item()
    bound = 2 * own_err + atol + rtol * ref.abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} > 2x torch's {own_err:.3g} (+ tolerances)"
