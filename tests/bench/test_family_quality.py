"""bench.quality.family_quality (every method on a second family) in its CPU smoke mode, and the results-table sanity
check.

The GPU run on Gemma 3 270M uses the same code with the standard sizes and settings; here a tiny random
Gemma 3 with a BOS-adding tokenizer goes through every method, and a tiny Phi-3 shows a refusal being
recorded. bench.tools.results_table withholds a compressed value that beats dense beyond the paired noise.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from bench.quality import family_quality as fq
from bench.tools import results_table as rt
from compress.data import load_text
from tests.tiny_families import save_family

SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster (conftest)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fq_text")
    text = load_text(None, "eval")
    (root / "valid.txt").write_text(text[:12_000])
    (root / "test.txt").write_text(text[12_000:24_000])
    (root / "other.txt").write_text(load_text(None, "calib")[:8_000])
    return root


def _run(model_dir, texts, out, *extra):
    return fq.main(["--smoke", "--model", str(model_dir), "--valid", str(texts / "valid.txt"),
                    "--test", str(texts / "test.txt"), "--seq-len", str(SEQ_LEN), "--calib-samples", "8",
                    "--eval-chunks", "6", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def gemma_result(tmp_path_factory, texts):
    model_dir = save_family("gemma3", tmp_path_factory.mktemp("fq_gemma") / "model", (texts / "valid.txt").read_text())
    out = tmp_path_factory.mktemp("fq_out")
    result = _run(model_dir, texts, out, "--eval", f"other={texts / 'other.txt'}")
    return model_dir, out, result


def test_smoke_every_method_on_gemma3(gemma_result):
    _, out, result = gemma_result
    saved = json.loads((out / "family_quality_gemma3_text_cpu.json").read_text())
    assert saved["methods"].keys() == set(fq.METHODS) and saved["refused"] == {}
    proto = saved["protocol"]
    assert proto["prefix_token"] == "<s>" and proto["scored_tokens_per_window"] == SEQ_LEN and proto["smoke"]
    for name in ("test", "other"):
        dense = saved["dense"][name]
        assert len(dense["window_nll"]) == 6 and math.isfinite(dense["perplexity"])
        assert dense["perplexity"] == pytest.approx(math.exp(sum(dense["window_nll"]) / (6 * SEQ_LEN)))
    for method, entry in saved["methods"].items():
        (point,) = entry["points"]
        assert point["requested"] == 0.8 and point["target_fraction"] < 0.99 and point["model_fraction"] < 0.99
        for name, ev in point["eval"].items():
            assert math.isfinite(ev["perplexity"]) and ev["log_ratio_se"] >= 0, method
            # paired over the same windows: the mean log-ratio is exactly log(ppl / dense)
            assert ev["log_ratio"] == pytest.approx(math.log(ev["perplexity"] / saved["dense"][name]["perplexity"]),
                                                    abs=1e-9)
            assert ev["beats_dense_beyond_noise"] == (ev["log_ratio"] < -fq.NOISE_SIGMAS * ev["log_ratio_se"])


def test_refusal_recorded_and_calls_merge(gemma_result, texts, tmp_path):
    model_dir = save_family("phi3", tmp_path / "phi3", (texts / "valid.txt").read_text())
    _run(model_dir, texts, tmp_path, "--methods", "minify")
    result = _run(model_dir, texts, tmp_path, "--methods", "svd", "--no-dense")
    assert "gate_up_proj" in result["refused"]["minify"] and list(result["methods"]) == ["svd"]
    saved = json.loads((tmp_path / "family_quality_phi3_cpu.json").read_text())
    assert saved["refused"].keys() == {"minify"} and saved["methods"].keys() == {"svd"}
    from compress.errors import UserError

    with pytest.raises(UserError, match="--no-dense"):  # stored dense windows of another length: no pairing
        _run(model_dir, texts, tmp_path, "--methods", "svd", "--no-dense", "--seq-len", "16")


def test_results_table_withholds_what_beats_dense_beyond_noise(gemma_result, tmp_path):
    _, out, result = gemma_result
    d = copy.deepcopy(json.loads((out / "family_quality_gemma3_text_cpu.json").read_text()))
    d["protocol"]["smoke"] = False  # smoke files are left out of the tables
    dense = d["dense"]["test"]["perplexity"]
    fake = d["methods"]["surgeon"]["points"][0]["eval"]["test"]
    fake.update(perplexity=dense / 4, log_ratio=-math.log(4), log_ratio_se=0.05)  # "4x better than dense"
    close = d["methods"]["svd"]["points"][0]["eval"]["test"]
    close.update(perplexity=dense * 0.99, log_ratio=math.log(0.99), log_ratio_se=0.05)  # within the noise
    d["refused"] = {"minify": "minify cannot prune mixture-of-experts MLPs: ..."}
    (tmp_path / "family_quality_gemma3_text_h200.json").write_text(json.dumps(d))
    (tmp_path / "family_quality_smoke_cpu.json").write_text((out / "family_quality_gemma3_text_cpu.json").read_text())
    text, _ = rt.generate(tmp_path, tmp_path / "results.md", None)
    section = text[text.index("## Quality: a second family"):text.index("## Speed")]
    assert "family_quality_smoke_cpu.json" not in text
    surgeon_row = next(line for line in section.splitlines() if line.startswith("| surgeon"))
    assert rt.WITHHELD in surgeon_row and rt.fmt_ppl(dense / 4) not in surgeon_row
    assert f"withheld: {rt.fmt_ppl(dense / 4)} at" in section  # listed with the flag instead
    svd_row = next(line for line in section.splitlines() if line.startswith("| svd"))
    assert rt.fmt_ppl(dense * 0.99) in svd_row
    assert "refused this family: minify cannot prune" in section
    assert "Perplexity on `other`" in section


def test_scoring_setup_per_device():
    """ACIP trains in bf16 with CUDA graphs on a GPU (SmolLM2's published protocol); all else stays float32."""
    assert fq.scoring_setup("acip", "cuda") == (torch.bfloat16, {"cuda_graphs": True})
    for method in fq.METHODS:
        assert fq.scoring_setup(method, "cpu") == (torch.float32, {})
        if method != "acip":
            assert fq.scoring_setup(method, "cuda") == (torch.float32, {})
    fq.scoring_setup("acip", "cuda")[1]["cuda_graphs"] = False  # callers get a copy, not the table
    assert fq.GPU_SCORING["acip"][1] == {"cuda_graphs": True}


def test_beats_dense_rule():
    point = rt.Point(0.8, 19.0, "0.8")
    assert rt.beats_dense(point, 21.0) and not rt.beats_dense(point, 19.1)  # default noise: 1%
    assert not rt.beats_dense(rt.Point(0.8, 19.0, "0.8", noise=0.2), 21.0)  # within a recorded noise
    assert not rt.beats_dense(rt.Point(1.0, 10.0, "1.0"), 21.0)  # the dense point itself
    assert not rt.beats_dense(point, None)
    assert "Pending" in "".join(rt.family_sections([]))
