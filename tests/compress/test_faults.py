"""Fault injection: bad input files, a full disk, Ctrl-C and SIGKILL, each against the real CLI in a subprocess.

Every case asserts the exit status, that stderr is one line (``error: ...`` naming the file or option
for user errors, ``interrupted`` for Ctrl-C) without a traceback, and that ``--out`` is either a
complete, loadable checkpoint or exactly what it was before (bit for bit, modes included).

The fast error cases are independent, so they are started together, a few at a time, when the module's
fixture builds their inputs (most of their cost is the interpreter importing torch). Phases too short
on a tiny model to be hit by a signal at a random moment stop at a named fault point instead
(``LOWRANK_FAULT``, `lowrank.faults`): the process prints ``fault point NAME`` and waits there for
the signal, which then has exactly the effect a Ctrl-C or a kill at that point has.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 420  # seconds for one CLI run on a loaded 2-core machine (they take 5-20 s)
TINY = ["--seq-len", "32", "--calib-samples", "4", "--batch-size", "2"]
EVAL_ONLY = ["--tasks", "none", "--samples", "0", "--seq-len", "32", "--eval-chunks", "1"]
ACIP_FAST = ["stop_ratio=0.6", "lr=0.02", "reg_start=0.01", "reg_update_every=1", "reg_update_factor=1.2",
             "lora_rank=4", "post_tune_steps=3", "max_steps=80", "checkpoint_every=1000"]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               LOWRANK_CACHE=str(cache), PYTHONPATH=str(REPO), LOWRANK_FAULT_SECONDS="180")
    env.pop("LOWRANK_FAULT", None)
    env.update(extra)
    return env


def _cli(argv: list, cache: Path, umask: int = -1, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", *map(str, argv)], cwd=REPO, env=_env(cache, **env),
                          capture_output=True, text=True, timeout=TIMEOUT, umask=umask)


def _one_error_line(result: subprocess.CompletedProcess, *needles: object) -> str:
    """Assert a user error: exit 2 and a single stderr line `error: ...` holding every needle."""
    detail = f"exit {result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, detail
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _snapshot(path: Path) -> dict[str, tuple[int, str]] | None:
    """{relative name: (mode, sha256)} of everything under `path`, or None where it does not exist."""
    if not path.exists():
        return None
    out = {".": (path.stat().st_mode, "")}
    for p in sorted(path.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(path))] = (p.stat().st_mode, digest)
    return out


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def _assert_loadable(path: Path) -> None:
    from lowrank import load_pretrained

    model = load_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 0


# ----------------------------------------------------------------------------- inputs
def _write_tiny_gguf(model_dir: Path, path: Path) -> None:
    """The tiny Llama of `model_dir` as an F32 GGUF that transformers converts back exactly."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def llama_cpp_order(w, heads):  # the q/k row order llama.cpp stores (transformers undoes it)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for key, tensor in load_file(str(model_dir / "model.safetensors")).items():
        array = tensor.float().numpy()
        if key.endswith("q_proj.weight"):
            array = llama_cpp_order(array, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            array = llama_cpp_order(array, cfg["num_key_value_heads"])
        writer.add_tensor(names[key], np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class Inputs:
    root: Path
    model: Path  # tiny HF model directory
    text: Path  # calibration / evaluation text
    plan: Path  # svd plan of the tiny model
    checkpoint: Path  # a compressed checkpoint (svd, 0.6)
    score_map: Path  # svd-magnitude score map
    gguf: Path  # the tiny model as a GGUF
    cache: Path  # LOWRANK_CACHE of the subprocesses
    files: dict[str, Path] = field(default_factory=dict)

    def fresh(self, name: str) -> Path:
        """A path that does not exist yet, for an --out that must stay absent."""
        return self.root / "outs" / name

    def copy_of_checkpoint(self, name: str) -> Path:
        target = self.root / "prev" / name / "out"
        shutil.copytree(self.checkpoint, target)
        return target


def _build_inputs(root: Path, model: Path, text: Path) -> Inputs:
    from compress.cli import main

    inputs = Inputs(root, model, text, root / "plan", root / "ckpt", root / "smap", root / "tiny.gguf", root / "cache")
    common = ["--model", model, "--data", text, "--no-eval", *TINY]
    assert main([str(a) for a in ["--method", "svd", "--size", "0.6", "--out", inputs.checkpoint,
                                  "--save-plan", inputs.plan, *common]]) == 0
    assert main([str(a) for a in ["--method", "svd-magnitude", "--size", "0.9", "--save-plan", inputs.score_map,
                                  *common]]) == 0
    _write_tiny_gguf(model, inputs.gguf)
    rng = random.Random(19)
    bad = root / "bad"
    bad.mkdir()

    def put(name: str, content: bytes | Path) -> Path:
        path = bad / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
        return path

    # The file: 3 MB of random bytes as --data.
    inputs.files["random.txt"] = put("random.txt", rng.randbytes(3_000_000))
    # Text and jsonl, truncated / garbage / empty / of the wrong type.
    inputs.files["truncated.txt"] = put("truncated.txt", ("naïve café " * 50).encode()[:-2])  # cut inside "é"
    inputs.files["garbage.txt"] = put("garbage.txt", rng.randbytes(20_000))
    inputs.files["empty.txt"] = put("empty.txt", b"")
    inputs.files["wrong.txt"] = put("wrong.txt", inputs.gguf)  # a GGUF model given as text
    inputs.files["truncated.jsonl"] = put("truncated.jsonl", b'{"text": "one"}\n{"text": "tw')
    inputs.files["garbage.jsonl"] = put("garbage.jsonl", rng.randbytes(20_000))
    inputs.files["empty.jsonl"] = put("empty.jsonl", b"\n\n")
    inputs.files["wrong.jsonl"] = put("wrong.jsonl", b'{"content": "no text field"}\n')
    # GGUF model files.
    raw = inputs.gguf.read_bytes()
    inputs.files["truncated.gguf"] = put("truncated.gguf", raw[: len(raw) // 2])
    inputs.files["garbage.gguf"] = put("garbage.gguf", rng.randbytes(len(raw)))
    inputs.files["empty.gguf"] = put("empty.gguf", b"")
    inputs.files["wrong.gguf"] = put("wrong.gguf", inputs.checkpoint / "model.safetensors")
    # Checkpoints whose model.safetensors is damaged.
    weights = (inputs.checkpoint / "model.safetensors").read_bytes()
    for form, content in [("truncated", weights[: len(weights) // 2]), ("garbage", rng.randbytes(len(weights))),
                          ("empty", b""), ("wrong", raw)]:
        shutil.copytree(inputs.checkpoint, bad / f"ckpt-{form}")
        inputs.files[f"{form}.safetensors"] = put(f"ckpt-{form}/model.safetensors", content)
    # Score maps: truncated tensors, garbage tensors, both files empty, a model config as the description.
    tensors = (inputs.score_map / "scoremap.safetensors").read_bytes()
    for form in ("truncated", "garbage", "empty", "wrong"):
        shutil.copytree(inputs.score_map, bad / f"smap-{form}")
    inputs.files["truncated.scoremap"] = put("smap-truncated/scoremap.safetensors", tensors[: len(tensors) // 2])
    inputs.files["garbage.scoremap"] = put("smap-garbage/scoremap.safetensors", rng.randbytes(len(tensors)))
    put("smap-empty/scoremap.safetensors", b"")
    inputs.files["empty.scoremap"] = put("smap-empty/scoremap.json", b"")
    inputs.files["wrong.scoremap"] = put("smap-wrong/scoremap.json", model / "config.json")
    return inputs


# ----------------------------------------------------------------------------- the fast error cases
@dataclass
class Case:
    argv: list
    needles: tuple
    out: Path | None = None  # must not exist afterwards
    env: dict = field(default_factory=dict)


def _data_case(inputs: Inputs, name: str, needle: str) -> Case:
    # --model does not exist: an error about the data proves the data is checked before the model loads.
    out = inputs.fresh(name)
    return Case(["--model", inputs.root / "no-such-model", "--data", inputs.files[name], "--out", out, *TINY],
                (inputs.files[name], needle), out)


def _model_case(inputs: Inputs, name: str, needle: str) -> Case:
    path = inputs.files[name]
    model = path.parent if path.suffix == ".safetensors" else path
    return Case(["eval", "--model", model, *EVAL_ONLY], (path, needle))


def _score_map_case(inputs: Inputs, name: str, needle: str) -> Case:
    out = inputs.fresh(name)
    return Case(["materialize", "--model", inputs.root / "no-such-model", "--scores", inputs.files[name].parent,
                 "--size", "0.9", "--out", out], (inputs.files[name], needle), out)


CASES = {
    # the rows
    "row: --data of 3 MB random bytes": lambda i: _data_case(i, "random.txt", "is not UTF-8 text (first bad byte at"),
    "row: eval a checkpoint whose model.safetensors is cut in half":
        lambda i: _model_case(i, "truncated.safetensors", "truncated"),
    "row: --model a GGUF cut short": lambda i: _model_case(i, "truncated.gguf", "truncated or corrupt GGUF"),
    "row: one meaning per option": lambda i: Case(
        ["--method", "acip", "--batch-size", "2", "--method-opt", "batch_size=2", "--model", i.root / "no-such"],
        ("--method-opt batch_size", "--batch-size")),
    # outputs written only after the long work are checked before the model (missing here) loads
    "--save-plan under a file": lambda i: Case(
        ["--model", i.root / "no-such-model", "--data", i.text, "--save-plan", i.text / "plan", *TINY],
        (i.text / "plan", "not writable")),
    "--checkpoint-dir under a file": lambda i: Case(
        ["--method", "acip", "--model", i.root / "no-such-model", "--data", i.text, "--checkpoint-dir",
         i.text / "ckpt", *TINY], (i.text / "ckpt", "not writable")),
    # text and jsonl
    "txt truncated": lambda i: _data_case(i, "truncated.txt", "not UTF-8 text (first bad byte at offset 647)"),
    "txt garbage": lambda i: _data_case(i, "garbage.txt", "not UTF-8 text"),
    "txt empty": lambda i: _data_case(i, "empty.txt", "empty"),
    "txt wrong type": lambda i: _data_case(i, "wrong.txt", "is not"),
    "jsonl truncated": lambda i: _data_case(i, "truncated.jsonl", ":2: not valid JSON"),
    "jsonl garbage": lambda i: _data_case(i, "garbage.jsonl", "not UTF-8 text"),
    "jsonl empty": lambda i: _data_case(i, "empty.jsonl", "empty"),
    "jsonl wrong type": lambda i: _data_case(i, "wrong.jsonl", ':1: each line needs a string field "text"'),
    # model files
    "gguf garbage": lambda i: _model_case(i, "garbage.gguf", "corrupt GGUF"),
    "gguf empty": lambda i: _model_case(i, "empty.gguf", "empty file"),
    "gguf wrong type": lambda i: _model_case(i, "wrong.gguf", "corrupt GGUF"),
    "safetensors garbage": lambda i: _model_case(i, "garbage.safetensors", "corrupted safetensors"),
    "safetensors empty": lambda i: _model_case(i, "empty.safetensors", "empty file"),
    "safetensors wrong type": lambda i: _model_case(i, "wrong.safetensors", "safetensors"),
    # score maps (checked before the model, which does not exist here, would load)
    "score map truncated": lambda i: _score_map_case(i, "truncated.scoremap", "cannot read"),
    "score map garbage": lambda i: _score_map_case(i, "garbage.scoremap", "cannot read"),
    "score map empty": lambda i: _score_map_case(i, "empty.scoremap", "not valid JSON"),
    "score map wrong type": lambda i: _score_map_case(i, "wrong.scoremap", "does not describe a score map"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, cli_text) -> Inputs:
    return _build_inputs(tmp_path_factory.mktemp("faults"), Path(tiny_model_dir), Path(cli_text))


@pytest.fixture(scope="module")
def launched(inputs):
    """Every fast case, started now, three processes at a time; {case id: (Case, Future)}."""
    pool = ThreadPoolExecutor(max_workers=3)
    cases = {name: make(inputs) for name, make in CASES.items()}
    futures = {name: (case, pool.submit(_cli, case.argv, inputs.cache, **case.env)) for name, case in cases.items()}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_before_the_work(launched, name):
    case, future = launched[name]
    _one_error_line(future.result(timeout=2 * TIMEOUT), *case.needles)
    if case.out is not None:
        assert not case.out.exists()


def test_the_tiny_gguf_is_valid(inputs, tmp_path, monkeypatch):
    """The GGUF whose damaged forms are tested above loads, as the very model it was written from."""
    import torch

    from compress.model import load_model

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(inputs.gguf)
    reference, _ = load_model(inputs.model)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


# ----------------------------------------------------------------------------- output: room, writability, save
def test_no_room_for_the_checkpoint_is_refused_before_the_work(inputs, monkeypatch, capsys):
    from compress.cli import main

    out = inputs.fresh("no-room")
    seen = []

    def eight_mib_free(path):
        seen.append(Path(path))
        return shutil._ntuple_diskusage(10**12, 10**12 - 8 * 2**20, 8 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", eight_mib_free)
    code = main([str(a) for a in ["--model", inputs.model, "--data", inputs.text, "--out", out,
                                  "--eval-chunks", "1", *TINY]])
    captured = capsys.readouterr()
    assert code == 2
    # In-process, transformers' loading bars share stderr (the subprocess cases turn them off).
    errors = [line for line in captured.err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0] == captured.err.strip().splitlines()[-1], captured.err
    assert errors[0].startswith("error: not enough room") and str(out) in errors[0] and "8 MiB free" in errors[0]
    assert "dense perplexity" not in captured.out  # refused before the first long phase
    assert seen and not out.exists()


def test_full_disk_at_the_save_is_one_line_and_keeps_the_plan(inputs):
    out = inputs.copy_of_checkpoint("enospc")
    before = _snapshot(out)
    plan = inputs.root / "enospc-plan"
    result = _cli(["--model", inputs.model, "--data", inputs.text, "--no-eval", "--size", "0.5", "--out", out,
                   "--save-plan", plan, *TINY], inputs.cache, LOWRANK_FAULT="save:written=enospc")
    _one_error_line(result, "cannot save the checkpoint to", out, "No space left on device", "is as it was")
    assert _snapshot(out) == before and _leftovers(out) == []
    from compress.api import load_plan

    assert load_plan(plan).method == "svd"  # the computed plan was saved first, and is kept


def test_checkpoint_and_score_map_get_umask_permissions(inputs):
    out, smap = inputs.fresh("perm-out"), inputs.fresh("perm-smap")
    result = _cli(["--method", "svd-magnitude", "--model", inputs.model, "--data", inputs.text, "--no-eval",
                   "--size", "0.9", "--out", out, "--save-plan", smap, *TINY], inputs.cache, umask=0o027)
    assert result.returncode == 0, result.stderr[-3000:]
    for root in (out, smap):
        for p in [root, *root.rglob("*")]:
            expected = 0o750 if p.is_dir() else 0o640  # what os.makedirs / open give under umask 027
            assert p.stat().st_mode & 0o777 == expected, (p, oct(p.stat().st_mode))
    _assert_loadable(out)


# ----------------------------------------------------------------------------- signals
class _Run:
    """A CLI subprocess whose stdout is watched for a line; stderr goes to a file."""

    def __init__(self, argv: list, inputs: Inputs, log: Path, **env: str) -> None:
        self.stderr_path = log
        self._stderr = open(log, "w")  # noqa: SIM115 (closed in finish)
        self.proc = subprocess.Popen([sys.executable, "-m", "compress", *map(str, argv)], cwd=REPO,
                                     env=_env(inputs.cache, **env), stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, marker: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith(marker):
                return
        self.proc.kill()
        raise AssertionError(f"never reached {marker!r}; exit {self.proc.wait()}, stderr: "
                             f"{self.stderr_path.read_text()[-3000:]}")

    def finish(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=TIMEOUT)
        self._stderr.close()
        return code, self.stderr_path.read_text()


def _interrupted(code: int, stderr: str) -> None:
    assert code == 130, f"exit {code}, stderr: {stderr[-3000:]}"
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["interrupted"], stderr[-3000:]


@pytest.mark.parametrize("point", ["save:written", "save:swap"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(inputs, point, tmp_path):
    out = inputs.copy_of_checkpoint(f"kill-{point.replace(':', '-')}")
    before = _snapshot(out)
    run = _Run(["materialize", "--model", inputs.model, "--scores", inputs.plan, "--size", "0.45", "--out", out],
               inputs, tmp_path / "stderr", LOWRANK_FAULT=point)
    run.wait_for(f"fault point {point}")
    code, _ = run.finish(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _snapshot(out) == before  # bit for bit, modes included
    _assert_loadable(out)
    assert _leftovers(out)  # the killed save's temporary directory, beside --out...
    from compress.model import load_model
    from lowrank import save_pretrained

    model, tokenizer = load_model(out)
    save_pretrained(model, out, tokenizer)  # ...which the next save to the same --out removes
    assert _leftovers(out) == []
    _assert_loadable(out)


@pytest.mark.parametrize("phase,point", [("calibration", "calibrate"), ("materialize", "materialize"),
                                         ("save", "save:written")])
def test_ctrl_c_in_a_long_phase_leaves_out_unchanged(inputs, phase, point, tmp_path):
    out = inputs.copy_of_checkpoint(f"int-{phase}")
    before = _snapshot(out)
    if phase == "calibration":
        argv = ["--model", inputs.model, "--data", inputs.text, "--no-eval", "--size", "0.5", "--out", out, *TINY]
    else:
        argv = ["materialize", "--model", inputs.model, "--scores", inputs.plan, "--size", "0.45", "--out", out]
    run = _Run(argv, inputs, tmp_path / "stderr", LOWRANK_FAULT=point)
    run.wait_for(f"fault point {point}")
    _interrupted(*run.finish(signal.SIGINT))
    assert _snapshot(out) == before and _leftovers(out) == []


def test_ctrl_c_during_acip_training_then_resume(inputs, tmp_path):
    """The issue's last row: Ctrl-C during ACIP scoring writes a resumable checkpoint; --resume finishes."""
    out, smap = tmp_path / "acip-out", tmp_path / "acip-smap"
    argv = ["--method", "acip", "--model", inputs.model, "--data", inputs.text, "--no-eval", "--size", "0.8",
            "--out", out, "--save-plan", smap, *TINY]
    for opt in ACIP_FAST:
        argv += ["--method-opt", opt]
    run = _Run(argv, inputs, tmp_path / "stderr", LOWRANK_FAULT="acip:step")
    run.wait_for("fault point acip:step")
    _interrupted(*run.finish(signal.SIGINT))
    assert "resumable checkpoint" in "".join(run.stdout)
    assert (smap / "checkpoint" / "state.pt").is_file()
    assert not out.exists() and _leftovers(out) == []
    resumed = _cli(argv + ["--resume"], inputs.cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed ACIP" in resumed.stdout
    _assert_loadable(out)
    assert json.loads((out / "compress_report.json").read_text())["method"] == "acip"


# ----------------------------------------------------------------------------- in-process: the boundary itself
def test_a_real_bug_keeps_its_traceback(inputs):
    from compress.cli import file_errors
    from compress.errors import UserError

    with pytest.raises(KeyError):  # raised by our code, with every input file intact: a bug, not bad input
        with file_errors("cannot load model", inputs.model):
            {}["missing"]
    with pytest.raises(UserError, match="model.safetensors: truncated"):
        with file_errors("cannot load model", inputs.files["truncated.safetensors"].parent):
            {}["missing"]  # whatever failed, a damaged file under the path is what the user is told about
    with pytest.raises(UserError, match="No space left on device .*is as it was"):
        with file_errors("cannot save the checkpoint to", inputs.fresh("x"), reading=False, atomic=True):
            raise OSError(28, "No space left on device")


def test_a_save_killed_between_two_renames_is_undone(inputs, monkeypatch):
    """Without an atomic exchange (non-Linux file systems) a save renames twice; a kill between the two
    leaves the previous checkpoint beside --out, and the next save puts it back before anything else."""
    from lowrank import checkpoint

    out = inputs.copy_of_checkpoint("two-renames")
    before = _snapshot(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    moved = out.parent / f".{out.name}.old-{dead.pid}-abc"
    os.replace(out, moved)  # the state right after the first rename
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_fsync_tree", fail)
    from compress.model import load_model

    model, tokenizer = load_model(inputs.checkpoint)
    with pytest.raises(OSError):
        checkpoint.save_pretrained(model, out, tokenizer)
    assert _snapshot(out) == before and _leftovers(out) == []
