"""bench.kernels.decode_attention: its contenders compute one function, its CLI refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch
from lowrank_kernels.utils import HAS_TRITON, interpreting

from bench.kernels import decode_attention as bench


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="the Triton path on the CPU needs TRITON_INTERPRET")
def test_contenders_agree_on_a_masked_grouped_cache():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 16, generator=g)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    mask = (torch.arange(40) < 23)[None, :].expand(2, 40).contiguous()
    outs = {name: call() for name, call in bench._contenders(q, k, v, mask).items()}
    assert set(outs) == {"decode_attention", "sdpa_gqa", "sdpa_repeat"}
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["sdpa_repeat"], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("argv,message", [
    (["--layouts", "nope"], "unknown layout"),
    (["--filled", "900", "--cache", "768"], "within 1..768"),
    (["--batches", "x"], "comma lists of integers"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert bench.main(["--layouts", "smollm2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_plot_draws_one_panel_per_layout_and_batch(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"layout": layout, "batch": 1, "filled": f, "contender": c, "us": 1.0 + f / 100}
            for layout in ("smollm2", "llama7b") for f in (128, 768) for c in ("decode_attention", "sdpa_gqa")]
    path = tmp_path / "p.png"
    bench.plot({"rows": rows, "cache": 768, "env": {"gpu": "test"}}, path)
    assert path.stat().st_size > 0
