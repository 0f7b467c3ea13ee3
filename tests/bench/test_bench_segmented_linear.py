"""bench.kernels.segmented_linear: its contenders compute one function, its CLI refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch

from bench.kernels import segmented_linear as bench


@pytest.mark.parametrize("model", list(bench.MODELS))
def test_contenders_agree_on_a_group(model):
    """On the CPU (the op's torch path, or its kernel under TRITON_INTERPRET), float32, small rows."""
    hidden, groups = bench.MODELS[model]
    name, outs = groups[0]
    if model == "llama7b":  # the same structure, scaled down to keep the CPU test quick
        hidden, outs = 256, [256, 64, 64]
    ranks = [bench.member_rank(0.5, o, hidden) for o in outs]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = bench._group_copy(hidden, outs, ranks, gen, device="cpu", dt=torch.float32)
    x = torch.randn(3, hidden, generator=gen)
    results = {}
    config = bench.config_candidates(3)[-1]  # a tuned launch config: the same function
    for contender, call in bench._contenders(x, w, config).items():
        y = call()
        results[contender] = torch.cat(y, 1) if isinstance(y, list) else y
    assert set(results) == set(bench.CONTENDERS)
    for contender, y in results.items():
        assert y.shape == (3, sum(outs))
        torch.testing.assert_close(y, results["cublas_members"], rtol=1e-4, atol=1e-4, msg=contender)


def test_ranks_follow_the_e2e_rounding():
    assert bench.member_rank(0.5, 4096, 4096) == 1024
    assert bench.member_rank(0.5, 11008, 4096) == 1504  # 1492.6 to the nearest multiple of 32
    assert bench.member_rank(0.5, 192, 576) == 64


@pytest.mark.parametrize("argv,message", [
    (["--models", "nope"], "unknown model"),
    (["--rows", "1,x"], "comma list of integers"),
    (["--rows", "0"], "--rows must be positive"),
    (["--size", "1.5"], "--size in (0, 1)"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert bench.main(["--models", "smollm2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
