"""Tests of lowrank_kernels.gram (G += XᵀX, exactly symmetric).

CPU CI runs the Triton kernels under ``TRITON_INTERPRET=1`` (fp32/fp16: the interpreter
has no bf16) with small odd shapes; ``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import pytest
import torch
from lowrank_kernels.gram import (
    GramConfig,
    _with_split,
    default_config,
    gram_accumulate,
    gram_accumulate_batched,
    gram_accumulate_ref,
)
from lowrank_kernels.utils import HAS_TRITON

from tests.kernels.triton_env import CUDA, INTERPRET, TRITON_DEVICE, gpu, needs_cuda, needs_triton

# (dtype, atol, rtol) for comparing against the fp64 reference.
DTYPES = [(torch.float32, 1e-4, 1e-5), (torch.float16, 1e-3, 1e-4)]
SMALL = GramConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=2)
RECT = GramConfig(block_m=32, block_n=64, block_k=16, num_warps=4, num_stages=2, group=1)
RECT_T = GramConfig(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2, group=2)


def _sym(d: int, device: str, seed: int) -> torch.Tensor:
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed))
    return (g + g.T).to(device)


def _x(n: int, d: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _torch_own(G0: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """What plain torch computes in the same dtype: fp32-accumulated XᵀX added to G."""
    try:
        prod = torch.mm(X.T, X, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # older torch, or no out_dtype kernel for this device/dtype
        prod = X.T.float() @ X.float()
    return G0 + prod


def _check_against_ref(G: torch.Tensor, G0: torch.Tensor, X: torch.Tensor, atol: float, rtol: float) -> None:
    ref = gram_accumulate_ref(G0, X)
    assert torch.isfinite(G).all()
    assert torch.equal(G, G.T), "result must be exactly symmetric"
    err, own = _rel(G, ref), _rel(_torch_own(G0, X), ref)
    assert err <= 2 * own + 1e-7, f"error {err:.3e} vs torch's own {own:.3e}"
    torch.testing.assert_close(G.double(), ref, atol=atol * X.shape[0] ** 0.5, rtol=rtol)


# ------------------------------------------------------------------------ Triton path
@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("cfg", [SMALL, RECT, RECT_T, None], ids=["32x32", "32x64", "64x32", "default"])
@pytest.mark.parametrize("d,n", [(77, 131), (64, 128), (5, 3)])
def test_triton_matches_fp64(dtype, atol, rtol, cfg, d, n):
    G0 = _sym(d, TRITON_DEVICE, 1)
    X = _x(n, d, dtype, TRITON_DEVICE, 2)
    G = G0.clone()
    out = gram_accumulate(G, X, backend="triton", config=cfg)
    assert out is G
    _check_against_ref(G, G0, X, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize(
    "cfg",
    [
        _with_split(SMALL, 3),
        _with_split(RECT, 2),
        GramConfig(block_m=32, block_n=32, block_k=16, mirror="separate"),
    ],
    ids=["split3", "rect-split2", "mirror-separate"],
)
def test_triton_split_k_and_separate_mirror(dtype, atol, rtol, cfg):
    d, n = 77, 131
    G0 = _sym(d, TRITON_DEVICE, 3)
    X = _x(n, d, dtype, TRITON_DEVICE, 4)
    G = G0.clone()
    gram_accumulate(G, X, backend="triton", config=cfg)
    _check_against_ref(G, G0, X, atol, rtol)


TMA_CONFIGS = [
    GramConfig(block_m=32, block_n=32, block_k=16, tma=True),
    GramConfig(block_m=32, block_n=64, block_k=16, tma=True, group=1),
    GramConfig(block_m=32, block_n=32, block_k=16, tma=True, persistent=1),
    GramConfig(block_m=32, block_n=32, block_k=16, tma=True, split_k=3),
]


@needs_triton
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=["square", "rect", "persistent", "split3"])
@pytest.mark.parametrize("d,n", [(80, 131), (40, 33)])
def test_triton_tma_path(cfg, d, n):
    """The TMA kernel (16-byte rows: d % 8 == 0); out-of-range boxes read as zeros."""
    G0 = _sym(d, TRITON_DEVICE, 90)
    X = _x(n, d, torch.float16, TRITON_DEVICE, 91)
    G = G0.clone()
    gram_accumulate(G, X, backend="triton", config=cfg)
    _check_against_ref(G, G0, X, 1e-3, 1e-4)


@needs_triton
@pytest.mark.parametrize(
    "cfg", [SMALL, _with_split(SMALL, 2), RECT, TMA_CONFIGS[0]], ids=["fused", "split", "rect", "tma"]
)
def test_triton_writes_every_lower_element(cfg):
    """Only the upper triangle is read: NaN in the strict lower triangle must be overwritten."""
    d, n = 80, 50
    G0 = _sym(d, TRITON_DEVICE, 5)
    G = G0.clone()
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device=TRITON_DEVICE), diagonal=-1)
    G[lower] = float("nan")
    X = _x(n, d, torch.float16, TRITON_DEVICE, 6)
    gram_accumulate(G, X, backend="triton", config=cfg)
    assert torch.isfinite(G).all()
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G.double(), gram_accumulate_ref(G0, X), atol=1e-3, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_chunking_equivalence(backend):
    d, n = 77, 131
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    G0 = _sym(d, dev, 7)
    X = _x(n, d, torch.float16, dev, 8)
    whole, chunked = G0.clone(), G0.clone()
    gram_accumulate(whole, X, backend=backend, config=SMALL if backend == "triton" else None)
    gram_accumulate(
        chunked, X, backend=backend, chunk_tokens=40, config=SMALL if backend == "triton" else None
    )
    assert torch.equal(chunked, chunked.T)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-6)


@needs_triton
def test_batched_equals_individual():
    dev = TRITON_DEVICE
    shapes = [(77, 131), (77, 64), (77, 200), (40, 33), (77, 17)]
    dtypes = [torch.float16, torch.float16, torch.float16, torch.float16, torch.float32]
    Gs = [_sym(d, dev, 10 + i) for i, (d, _) in enumerate(shapes)]
    pairs = enumerate(zip(shapes, dtypes, strict=True))
    Xs = [_x(n, d, dt, dev, 20 + i) for i, ((d, n), dt) in pairs]
    # The same G twice: the second pair must see the first pair's update (sequential semantics).
    Gs.append(Gs[0])
    Xs.append(_x(90, 77, torch.float16, dev, 30))
    fixed = _with_split(SMALL, 1)
    expect = [g.clone() for g in Gs[:-1]]
    for i, x in enumerate(Xs):
        j = 0 if i == len(Xs) - 1 else i
        gram_accumulate(expect[j], x, backend="triton", config=fixed)
    got = gram_accumulate_batched(Gs, Xs, backend="triton", config=fixed)
    assert got[0] is Gs[0]
    for g, e in zip(Gs[:-1], expect, strict=True):
        # Same kernel, same tiles, same K order: batching must not change a single bit.
        assert torch.equal(g, e)
        assert torch.equal(g, g.T)


@needs_triton
def test_batched_default_config_and_chunks():
    dev = TRITON_DEVICE
    Gs = [_sym(48, dev, 40 + i) for i in range(3)]
    Xs = [_x(n, 48, torch.float16, dev, 50 + i) for i, n in enumerate((70, 5, 33))]
    G0s = [g.clone() for g in Gs]
    gram_accumulate_batched(Gs, Xs, backend="triton", chunk_tokens=32)
    for g, g0, x in zip(Gs, G0s, Xs, strict=True):
        _check_against_ref(g, g0, x, 1e-3, 1e-4)


@needs_triton
def test_triton_leading_dims_and_strided_x():
    d = 33
    G0 = _sym(d, TRITON_DEVICE, 60)
    base = _x(2 * 3 * 2, d, torch.float16, TRITON_DEVICE, 61).reshape(2, 3, 2, d)
    X = base[:, :, 0, :]  # [2, 3, d], row stride 2d: a strided view the kernel reads directly
    G = G0.clone()
    gram_accumulate(G, X, backend="triton", config=SMALL)
    _check_against_ref(G, G0, X.reshape(-1, d), 1e-3, 1e-4)
    Xt = _x(d, 9, torch.float16, TRITON_DEVICE, 62).T  # unit stride on the wrong axis: copied
    G = G0.clone()
    gram_accumulate(G, Xt, backend="triton", config=SMALL)
    _check_against_ref(G, G0, Xt, 1e-3, 1e-4)


# ------------------------------------------------------------------------ torch path / API
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES + [(torch.bfloat16, 1e-3, 1e-4)])
def test_torch_backend(dtype, atol, rtol):
    d, n = 77, 131
    G0 = _sym(d, "cpu", 70)
    X = _x(n, d, dtype, "cpu", 71)
    G = G0.clone()
    gram_accumulate(G, X, backend="torch", chunk_tokens=50)
    _check_against_ref(G, G0, X, atol, rtol)
    G2 = G0.clone()
    gram_accumulate(G2, X)  # auto on CPU: torch
    assert torch.equal(G2, G2.T)


def test_batched_torch_backend():
    Gs = [_sym(d, "cpu", 80 + d) for d in (16, 23)]
    Xs = [_x(40, d, torch.bfloat16, "cpu", 90 + d) for d in (16, 23)]
    G0s = [g.clone() for g in Gs]
    gram_accumulate_batched(Gs, Xs, backend="torch")
    for g, g0, x in zip(Gs, G0s, Xs, strict=True):
        _check_against_ref(g, g0, x, 1e-3, 1e-4)


def test_empty_x_is_noop():
    G0 = _sym(8, "cpu", 100)
    G = G0.clone()
    gram_accumulate(G, torch.empty(0, 8, dtype=torch.float16))
    assert torch.equal(G, G0)


def test_safe_in_forward_hook():
    lin = torch.nn.Linear(12, 4)
    G = torch.zeros(12, 12)

    def hook(_mod, inputs, _out):
        gram_accumulate(G, inputs[0])

    lin.register_forward_hook(hook)
    x = torch.randn(5, 12, requires_grad=True)
    lin(x).sum().backward()
    assert G.grad_fn is None and not G.requires_grad
    torch.testing.assert_close(
        G.double(), (x.detach().double().T @ x.detach().double()), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 4)), "float32"),
        (lambda: (torch.zeros(4, 5), torch.zeros(3, 4)), "square"),
        (lambda: (torch.zeros(4), torch.zeros(3, 4)), "square"),
        (lambda: (torch.zeros(4, 4), torch.zeros(3, 5)), "last dimension"),
        (lambda: (torch.zeros(8, 8)[::2, ::2], torch.zeros(3, 4)), "contiguous"),
        (lambda: (torch.zeros(4, 4), torch.zeros(3, 4, dtype=torch.int32)), "bfloat16"),
        (lambda: (torch.zeros(4, 4), torch.zeros((), dtype=torch.float16)), "at least one"),
        (lambda: (torch.zeros(4, 4, requires_grad=True), torch.zeros(3, 4)), "grad"),
        (lambda: (torch.zeros(4, 4, device="meta"), torch.zeros(3, 4)), "device|on"),
    ],
)
def test_errors(make, match):
    G, X = make()
    with pytest.raises(ValueError, match=match):
        gram_accumulate(G, X)


def test_option_errors():
    G, X = torch.zeros(4, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        gram_accumulate(G, X, chunk_tokens=0)
    with pytest.raises(ValueError, match="backend"):
        gram_accumulate(G, X, backend="cublas")
    with pytest.raises(ValueError, match="2 G matrices but 1"):
        gram_accumulate_batched([G, G.clone()], [X])
    with pytest.raises(ValueError, match=r"_batched\[1\]"):
        gram_accumulate_batched([G, torch.zeros(5, 5)], [X, X])
    with pytest.raises(ValueError, match="block_m"):
        GramConfig(block_m=48)


@pytest.mark.skipif(INTERPRET or CUDA or not HAS_TRITON, reason="only where Triton cannot run")
def test_triton_backend_unavailable_is_clear():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gram_accumulate(torch.zeros(4, 4), torch.zeros(3, 4, dtype=torch.float16), backend="triton")


def test_default_config_shapes():
    assert default_config(4096, torch.bfloat16).block_m == 128
    assert default_config(576, torch.bfloat16).block_m == 128
    assert default_config(1536, torch.bfloat16).block_m == 64
    assert default_config(77, torch.float32).block_k == 32


# ------------------------------------------------------------------------ GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("d,n", [(4096, 2048), (576, 4096), (1000, 999), (1536, 333)])
def test_gpu_bf16_accuracy_and_symmetry(d, n):
    G0 = _sym(d, "cuda", 200)
    X = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    G = G0.clone()
    gram_accumulate(G, X)  # auto: Triton on CUDA
    torch.cuda.synchronize()
    assert torch.equal(G, G.T)
    ref = gram_accumulate_ref(G0, X)
    assert _rel(G, ref) <= 1e-3
    own = _rel(_torch_own(G0, X), ref)
    assert _rel(G, ref) <= 2 * own + 1e-7


@gpu
@needs_cuda
@pytest.mark.parametrize("split", [1, 2, 5])
def test_gpu_split_k_paths(split):
    d, n = 640, 3000
    G0 = _sym(d, "cuda", 210)
    X = torch.randn(n, d, device="cuda", dtype=torch.float16)
    G = G0.clone()
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device="cuda"), diagonal=-1)
    G[lower] = float("nan")
    gram_accumulate(G, X, config=_with_split(default_config(d, X.dtype), split))
    assert torch.isfinite(G).all() and torch.equal(G, G.T)
    ref = gram_accumulate_ref(G0, X)
    # fp32 accumulation of 3000 products: compare with what torch itself gets.
    assert _rel(G, ref) <= 2 * _rel(_torch_own(G0, X), ref) + 1e-6


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", TMA_CONFIGS[:3] + [GramConfig(tma=True, num_warps=4, persistent=2)])
def test_gpu_tma_configs(cfg):
    d, n = 1000, 777
    G0 = _sym(d, "cuda", 240)
    X = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    G = G0.clone()
    gram_accumulate(G, X, config=cfg)
    assert torch.equal(G, G.T)
    ref = gram_accumulate_ref(G0, X)
    assert _rel(G, ref) <= 2 * _rel(_torch_own(G0, X), ref) + 1e-6


@gpu
@needs_cuda
def test_gpu_torch_backend_uses_bounded_memory():
    d, n = 512, 8192
    G0 = _sym(d, "cuda", 250)
    X = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    G = G0.clone()
    gram_accumulate(G, X, backend="torch")
    assert torch.equal(G, G.T)
    assert _rel(G, gram_accumulate_ref(G0, X)) <= 1e-3


@gpu
@needs_cuda
def test_gpu_batched_one_launch_matches_loop():
    Gs = [_sym(1024, "cuda", 220 + i) for i in range(3)]
    Xs = [torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16) for n in (512, 1000, 64)]
    fixed = _with_split(default_config(1024, torch.bfloat16), 1)
    expect = [g.clone() for g in Gs]
    for g, x in zip(expect, Xs, strict=True):
        gram_accumulate(g, x, config=fixed)
    gram_accumulate_batched(Gs, Xs, config=fixed)
    for g, e in zip(Gs, expect, strict=True):
        assert torch.equal(g, e)


@gpu
@needs_cuda
def test_gpu_fp32_input_is_exact_path():
    d, n = 300, 500
    G0 = _sym(d, "cuda", 230)
    X = torch.randn(n, d, device="cuda")
    G = G0.clone()
    gram_accumulate(G, X, backend="triton")
    assert torch.equal(G, G.T)
    assert _rel(G, gram_accumulate_ref(G0, X)) <= 1e-6
