"""`python -m compress eval`: perplexity, zero-shot tasks through a (faked) lm-evaluation-harness, samples."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from compress import eval as evaluation
from compress.cli import main
from compress.data import load_text
from compress.errors import UserError
from tests.conftest import make_tiny_llama

QUICK = ["--seq-len", "32", "--eval-chunks", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved with a small byte-level BPE tokenizer trained here (as in test_cli_svd)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([load_text(None, "calib")[:20_000]],
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = make_tiny_llama(vocab=len(tok), layers=2)
    model.generation_config.eos_token_id = None  # never stop early: samples have a known length
    path = tmp_path_factory.mktemp("tiny-eval") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_lm_eval(monkeypatch):
    """lm-eval absent, whether or not it is installed (a None entry makes `import lm_eval` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """A stand-in lm-evaluation-harness recording how it is called (replaces a real install too)."""
    calls: dict = {"hflm": [], "evaluate": []}
    failures: dict[str, BaseException] = {}

    class HFLM:
        def __init__(self, **kwargs):
            calls["hflm"].append(kwargs)

    class TaskManager:
        all_tasks = ["piqa", "arc_easy", "hellaswag", "mmlu"]

    def simple_evaluate(**kwargs):
        calls["evaluate"].append(kwargs)
        (task,) = kwargs["tasks"]
        if task in failures:
            raise failures[task]
        return {"results": {task: {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.1,
                                   "acc_norm,none": 0.625, "acc_norm_stderr,none": "N/A"}},
                "n-samples": {task: {"original": 1000, "effective": kwargs["limit"] or 1000}}}

    root = types.ModuleType("lm_eval")
    root.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = TaskManager
    for name, module in [("lm_eval", root), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf),
                         ("lm_eval.tasks", tasks)]:
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(calls=calls, failures=failures)


def _run(argv, capsys):
    code = main(["eval", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(stdout: str) -> dict:
    return json.loads(stdout)  # stdout holds the JSON report and nothing else


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_on_a_text_file_and_report_file(model_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(load_text(None, "eval")[:6000])
    out = tmp_path / "report"
    code, stdout, err = _run(["--model", model_dir, "--data", data, *QUICK, "--tasks", "none", "--samples", "0",
                              "--out", out], capsys)
    assert code == 0, err
    report = _report(stdout)
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    assert report["seq_len"] == 32 and report["data"] == str(data)
    assert "zero_shot" not in report and "samples" not in report
    assert json.loads((out / "eval_report.json").read_text()) == report
    assert [p.name for p in out.iterdir()] == ["eval_report.json"]  # no temporary file left behind
    assert "perplexity" in err

    # the same text scored through the library function gives the same number
    model, tok = _load(model_dir)
    assert evaluation.perplexity(model, tok, data.read_text(), 32, max_chunks=2, progress=False) == pytest.approx(
        report["perplexity"], rel=1e-6)


def _load(model_dir):
    from compress.model import load_model

    return load_model(model_dir, dtype="float32", device="cpu")


# ----------------------------------------------------------------------------- samples
def test_samples_are_greedy_and_deterministic(model_dir):
    model, tok = _load(model_dir)
    model.generation_config.do_sample = True  # a checkpoint asking for sampling still decodes greedily
    model.generation_config.temperature = 0.7
    prompts = ["The capital of France is", "def main():"]
    first = evaluation.generate_samples(model, tok, prompts, max_new_tokens=6)
    second = evaluation.generate_samples(model, tok, prompts, max_new_tokens=6)
    assert first == second and len(first) == 2 and all(first)
    ids = tok(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tok.decode(ids[0, -6:], skip_special_tokens=True)
    assert first[0] == expected


def test_cli_samples_default_and_prompts_file(model_dir, tmp_path, capsys, no_lm_eval):
    code, stdout, err = _run(["--model", model_dir, *QUICK, "--tasks", "none", "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    samples = _report(stdout)["samples"]
    assert [s["prompt"] for s in samples] == list(evaluation.DEFAULT_PROMPTS[:3])
    assert all(s["completion"] for s in samples) and err.count("[sample ") == 3

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\n  second prompt\nthird\n")
    argv = ["--model", model_dir, *QUICK, "--tasks", "none", "--prompts", prompts, "--samples", "2",
            "--max-new-tokens", "4"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    samples = _report(stdout)["samples"]
    assert [s["prompt"] for s in samples] == ["first prompt", "  second prompt"]
    code, again, _ = _run(argv, capsys)
    assert _report(again)["samples"] == samples


# ----------------------------------------------------------------------------- zero-shot
def test_lm_eval_absent_skips_with_one_line(model_dir, capsys, no_lm_eval):
    code, stdout, err = _run(["--model", model_dir, *QUICK, "--samples", "0", "--limit", "10"], capsys)
    assert code == 0, err
    report = _report(stdout)
    assert math.isfinite(report["perplexity"])
    assert report["zero_shot"]["tasks"] == {}
    assert sorted(report["zero_shot"]["skipped"]) == sorted(evaluation.DEFAULT_TASKS)
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "lm-eval is not installed" in lines[0]
    assert all(task in lines[0] for task in evaluation.DEFAULT_TASKS)
    assert "Traceback" not in err


def test_lm_eval_wiring_with_in_memory_model(model_dir, capsys, fake_lm_eval):
    code, stdout, err = _run(["--model", model_dir, *QUICK, "--samples", "0", "--tasks", "piqa,arc_easy",
                              "--limit", "20", "--task-batch-size", "4"], capsys)
    assert code == 0, err
    (hflm,) = fake_lm_eval.calls["hflm"]
    assert isinstance(hflm["pretrained"], torch.nn.Module)  # the loaded model itself, not its path
    assert hflm["batch_size"] == 4 and hasattr(hflm["tokenizer"], "decode")
    evaluated = fake_lm_eval.calls["evaluate"]
    assert [c["tasks"] for c in evaluated] == [["piqa"], ["arc_easy"]]
    assert all(c["limit"] == 20 and c["num_fewshot"] == 0 and c["task_manager"] is not None for c in evaluated)
    assert len({id(c["model"]) for c in evaluated}) == 1  # one wrapper for every task
    zero_shot = _report(stdout)["zero_shot"]
    assert zero_shot["skipped"] == {} and zero_shot["limit"] == 20
    assert zero_shot["tasks"]["piqa"] == {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.625, "samples": 20}
    assert "piqa: acc 0.5000, acc_norm 0.6250" in err and "skipped" not in err


def test_offline_dataset_skips_that_task_only(model_dir, capsys, fake_lm_eval):
    fake_lm_eval.failures["hellaswag"] = ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (offline)")
    code, stdout, err = _run(["--model", model_dir, *QUICK, "--samples", "0", "--tasks", "piqa,hellaswag"], capsys)
    assert code == 0, err
    zero_shot = _report(stdout)["zero_shot"]
    assert list(zero_shot["tasks"]) == ["piqa"] and list(zero_shot["skipped"]) == ["hellaswag"]
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "hellaswag" in lines[0] and "ConnectionError" in lines[0]


def test_a_bug_during_a_task_is_not_hidden(tiny_llama, fake_lm_eval):
    fake_lm_eval.failures["piqa"] = RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluation.zero_shot(tiny_llama, object(), ["piqa"], None, 2)


def test_zero_shot_function_without_lm_eval(tiny_llama, no_lm_eval):
    result = evaluation.zero_shot(tiny_llama, object(), ["piqa", "mathqa"], limit=5, batch_size=2)
    assert result["tasks"] == {} and set(result["skipped"]) == {"piqa", "mathqa"}
    assert evaluation.check_tasks(["anything"]) is None
    assert "piqa, mathqa" in evaluation.skip_summary(result)


def test_metrics_parsing_keeps_filters_and_drops_non_numbers():
    out = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,none": "N/A",
                                 "acc,none": float("nan")}}}
    assert evaluation._metrics(out) == {"gsm8k": {"exact_match,strict-match": 0.25}}
    assert evaluation._metrics(None) == {}


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--limit", "0"], "--limit"),
        (["--limit", "-3"], "--limit"),
        (["--limit", "2.5"], "--limit"),
        (["--limit", "lots"], "--limit"),
        (["--prompts", "/no/such/prompts.txt"], "prompts file not found"),
        (["--samples", "-1"], "--samples"),
        (["--samples", "50"], "built-in prompts"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--task-batch-size", "0"], "--task-batch-size"),
    ],
)
def test_user_errors_are_one_line(argv, needle, model_dir, capsys):
    code, stdout, err = _run(["--model", model_dir, *argv], capsys)
    assert code == 2 and stdout == ""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_unknown_task_is_a_user_error_when_lm_eval_is_present(model_dir, capsys, fake_lm_eval):
    code, _, err = _run(["--model", model_dir, "--tasks", "piqa,no_such_task,other"], capsys)
    assert code == 2 and "unknown lm-eval task(s): no_such_task, other" in err
    assert len(err.strip().splitlines()) == 1
    assert fake_lm_eval.calls["hflm"] == []  # refused before any model work


def test_empty_prompts_file_and_limit_parsing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts"):
        evaluation.read_prompts(empty)
    assert evaluation.parse_limit(None) is None
    assert evaluation.parse_limit("100") == 100 and isinstance(evaluation.parse_limit("100.0"), int)
    assert evaluation.parse_limit("0.25") == 0.25


def test_device_peaks_without_a_gpu_are_marked_nominal(monkeypatch):
    """On a CPU the floors fall back to the nominal figures and say so; the env overrides win."""
    from compress import timing

    if torch.cuda.is_available():
        pytest.skip("measures on a GPU instead")
    timing.device_peaks.cache_clear()
    peaks = timing.device_peaks()
    assert (peaks.tbps, peaks.tflops) == (timing.HBM_TBPS, timing.PEAK_BF16_TFLOPS) and "nominal" in peaks.source
    monkeypatch.setenv("LOWRANK_PEAK_TBPS", "4.25")
    timing.device_peaks.cache_clear()
    assert timing.device_peaks().tbps == 4.25 and timing.device_peaks().as_dict()["tbps"] == 4.25
    timing.device_peaks.cache_clear()
