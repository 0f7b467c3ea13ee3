"""Model surgery, size accounting, checkpoints loaded by plain from_pretrained, crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank
from lowrank import CheckpointError, LowRankLinear, factorize_, save_pretrained, size_report, target_linears
from lowrank.checkpoint import verify_safetensors
from lowrank.surgery import aligned_rank
from tests.conftest import make_tiny_llama, requires_smollm2

REPO = Path(__file__).resolve().parents[2]


def test_targets_are_decoder_linears_only(tiny_llama):
    names = list(target_linears(tiny_llama))
    assert len(names) == 2 * 7
    assert all(".layers." in n for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_factorize_ranks_per_layer_and_report(tiny_llama):
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 12}
    report = factorize_(tiny_llama, ranks)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank == 8
    assert tiny_llama.model.layers[1].mlp.down_proj.rank == 12
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, torch.nn.Linear)
    dense_total = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3)
    assert report.target_dense_params == dense_total
    expected = dense_total - 64 * 64 + 8 * 128 - 160 * 64 + 12 * 224
    assert report.target_params == expected
    assert report.ranks == ranks


def test_factorize_keeps_dense_when_no_saving(tiny_llama):
    # 64x64 at rank 32: 32*128 = 64*64 -> saves nothing, stays dense
    factorize_(tiny_llama, lambda name, lin: 32)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(tiny_llama.model.layers[0].mlp.gate_proj, LowRankLinear)


def test_rank_alignment():
    assert aligned_rank(1492, 64, 4096) == 1472
    assert aligned_rank(10, 64, 4096) == 64
    assert aligned_rank(1492, 1, 4096) == 1492
    assert aligned_rank(5000, 128, 4096) == 4096


def test_factorize_rejects_unknown_names(tiny_llama):
    with pytest.raises(ValueError, match="not target linears"):
        factorize_(tiny_llama, {"model.embed_tokens": 4})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_then_plain_from_pretrained_is_bitwise(tmp_path, random_tokens, arch):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(arch=arch)
    factorize_(model, lambda name, lin: 6 if "mlp" in name else 5)
    x = random_tokens(vocab=128)
    with torch.no_grad():
        before = model(x).logits
    out = save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowrank"
    assert len(config["quantization_config"]["ranks"]) == 14
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded.model.layers[1].mlp.up_proj, LowRankLinear)
    with torch.no_grad():
        after = loaded(x).logits
    assert torch.equal(before, after)
    # load_pretrained is the same thing, plus integrity checks
    again = lowrank.load_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, before)


def test_plain_from_pretrained_in_fresh_process(tmp_path):
    """The registration happens on `import lowrank`, with the repo root as working directory
    (where a folder named `kernels/` must not shadow Hugging Face's hub-kernels; tests/test_namespace.py)."""
    model = make_tiny_llama()
    factorize_(model, lambda name, lin: 4)
    save_pretrained(model, tmp_path / "ckpt")
    code = (
        "import lowrank, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'ckpt'}')\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("LowRankLinear")


def test_dense_llama_loads_with_package_installed(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    code = (
        "import transformers, lowrank, lowrank_kernels.lowrank_matmul\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'dense'}')\n"
        "print(type(m).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LlamaForCausalLM" in result.stdout


def test_crash_mid_write_leaves_nothing_loadable(tmp_path, monkeypatch):
    model = make_tiny_llama()
    factorize_(model, lambda name, lin: 4)
    target = tmp_path / "ckpt"

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the tokenizer")

    class FakeTokenizer:
        save_pretrained = staticmethod(boom)

    with pytest.raises(RuntimeError, match="simulated crash"):
        save_pretrained(model, target, tokenizer=FakeTokenizer())
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory was cleaned up too


def test_crash_keeps_previous_checkpoint(tmp_path, random_tokens):
    model = make_tiny_llama()
    factorize_(model, lambda name, lin: 4)
    target = save_pretrained(model, tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()

    class FakeTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pretrained(make_tiny_llama(seed=1), target, tokenizer=FakeTokenizer())
    assert (target / "model.safetensors").read_bytes() == before


def test_truncated_shard_error_names_file(tmp_path):
    model = make_tiny_llama()
    factorize_(model, lambda name, lin: 4)
    out = save_pretrained(model, tmp_path / "ckpt")
    shard = out / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_safetensors(shard)
    with pytest.raises(CheckpointError, match="truncated"):
        lowrank.load_pretrained(out)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lowrank.load_pretrained(out)


def test_unwritable_output(tmp_path):
    model = make_tiny_llama()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError):
        save_pretrained(model, blocker)


@requires_smollm2
@pytest.mark.slow
def test_smollm2_half_size_checkpoint_bytes(smollm2, tmp_path, random_tokens):
    """Targeted linears at 50% of their parameters -> checkpoint at most 65% of the dense bytes."""
    import copy

    model, tokenizer = smollm2
    dense_dir = save_pretrained(model, tmp_path / "dense")
    compressed = copy.deepcopy(model)
    report = factorize_(compressed, lambda name, lin: int(0.5 * lin.in_features * lin.out_features
                                                           / (lin.in_features + lin.out_features)))
    assert abs(report.target_fraction - 0.5) < 0.01
    out = save_pretrained(compressed, tmp_path / "half", tokenizer)

    def nbytes(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("*.safetensors"))

    ratio = nbytes(out) / nbytes(dense_dir)
    assert ratio <= 0.65, ratio
    loaded = lowrank.load_pretrained(out)
    x = random_tokens(batch=1, seq=24, vocab=49152)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, compressed(x).logits)
    assert size_report(loaded).target_params == report.target_params
