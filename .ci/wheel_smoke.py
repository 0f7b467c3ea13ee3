"""Smoke test of an installed (non-editable) wheel, run by .ci/run from a directory outside the repo.

Checks what a user of the wheel touches first: `python -m compress --help` (and `bench --help`,
whose code must ship in the package), a `LowRankLinear` forward, the kernels' package data, and a
save / plain `AutoModelForCausalLM.from_pretrained` / generate round trip on a tiny random model.
Exits non-zero with a message on the first failure.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"wheel smoke: FAILED: {what}")
    print(f"wheel smoke: ok: {what}")


def main() -> None:
    import compress
    import lowrank

    repo_markers = [Path(m.__file__).resolve() for m in (compress, lowrank)]
    check(all("site-packages" in str(p) for p in repo_markers), f"imported from site-packages: {repo_markers}")

    for argv in (["--help"], ["bench", "--help"], ["eval", "--help"]):
        run = subprocess.run([sys.executable, "-m", "compress", *argv], capture_output=True, text=True, timeout=300)
        check(run.returncode == 0 and run.stdout.startswith("usage:"), f"python -m compress {' '.join(argv)}"
              + ("" if run.returncode == 0 else f" ({run.stderr.strip().splitlines()[-1:]})"))

    import importlib.util

    spec = importlib.util.find_spec("kernels")
    origin = getattr(spec, "origin", None)
    check(spec is None or "lowrank" not in str(origin), f"`kernels` is not ours (origin {origin})")

    import torch

    from lowrank import LowRankLinear, factorize_, save_pretrained

    dense = torch.nn.Linear(96, 80)
    layer = LowRankLinear.from_linear(dense, rank=80)
    x = torch.randn(4, 96)
    check(torch.allclose(layer(x), dense(x), atol=1e-4), "LowRankLinear full-rank forward matches nn.Linear")

    import lowrank_kernels._ext as ext
    import lowrank_kernels.lowrank_matmul as lm
    from lowrank_kernels import tuning

    check(callable(lm.lowrank_matmul) and lm.__name__ == "lowrank_kernels.lowrank_matmul",
          "lowrank_kernels.lowrank_matmul is the module, its lowrank_matmul the function")
    check(tuning.CONFIG_PATH.is_file(), f"tuned table shipped ({tuning.CONFIG_PATH.name})")
    check(all((ext._CSRC / s).is_file() for s in ext._SOURCES), f"csrc/ shipped for the JIT build ({ext._CSRC})")

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    factorize_(model, lambda name, lin: 8)
    ids = torch.randint(0, 128, (1, 6))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "ckpt")
        loaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "ckpt").eval()
        with torch.no_grad():
            same = torch.equal(model(ids).logits, loaded(ids).logits)
        check(same, "save_pretrained -> plain from_pretrained is bitwise")
        out = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        check(out.shape == (1, 11), "the loaded checkpoint generates")
    _ = lowrank.__name__


if __name__ == "__main__":
    main()
