"""ACIP scoring under FSDP2: two CPU processes (gloo, launched by torchrun) against one process.

The two-process runs happen in one `torchrun --nproc-per-node 2` launch of this module (see
`_worker`); the test compares what they wrote with one-process runs on the same fresh random
calibration ids, same seed, same data order:

- against one process that sums the gradients of the same two half-batches in the same order
  (what the two ranks' all-reduce does): equal bit for bit. This pins the distributed code
  down exactly: sharding, data split, gradient averaging, agreement and checkpoints change
  nothing else;
- against the plain one-process run (one mean over the whole batch): equal up to
  reduction-order noise, amplified by training. Scores within 1e-5 absolute (≤ 7.9e-7 seen
  over 120 seeds, measured with the in-process two-rank order), the pruning order (the step
  at which each entry was pruned) and the ranks selected at several sizes exactly; LoRA within
  1e-3 (≤ 1.7e-4 seen): B starts at zero, so A's first gradients are at rounding level, and
  AdamW divides each entry by its own RMS, which turns their relative noise into visible step
  differences on single entries.

Settings: the tiny model reaches the stop ratio in ~15 steps; lr is not a divisor of the mask
scale (else masks land on 0 exactly and rounding decides their sign); dropout is off (with
dropout each rank draws its own masks, so runs agree in distribution only).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress.errors import UserError
from compress.methods.acip import ACIPConfig, ScoreMap, run_acip
from compress.methods.acip.functional import l1_penalty
from compress.methods.acip.train import ACIPPaused
from tests.conftest import make_tiny_llama

VOCAB = 128
ROOT = Path(__file__).resolve().parents[2]
ATOL_SCORES = 1e-5
ATOL_LORA = 1e-3
PAUSE_AT = 5
SETTINGS = dict(whiten_samples=8, stop_ratio=0.6, lr=4.5e-3, reg_start=5e-2, reg_update_every=1,
                reg_update_factor=1.3, lora_rank=4, lora_dropout=0.0, post_tune_steps=4, max_steps=80,
                batch_size=4, checkpoint_every=3, progress=False, seed=3)


def _config(**overrides) -> ACIPConfig:
    # distill=0: `_two_rank_step` replays the two ranks' NLL-only step (the CLI test below runs the default,
    # distillation, under a real two-process launch).
    return ACIPConfig(**{"distill": 0.0, **SETTINGS, **overrides})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_step(model, bank, optimizer, batch, reg):
    # The two ranks' step in one process: each half-batch's gradient (its own token mean plus
    # the penalty), summed in the order gloo's all-reduce sums two ranks, then halved.
    nlls = []
    for half in batch.chunk(2):
        bank.refresh()
        nll = model(input_ids=half, labels=half, use_cache=False).loss
        (nll + reg * l1_penalty(bank.p) if reg is not None else nll).backward()
        nlls.append(nll.detach())
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.div_(2)
    optimizer.step()
    return (nlls[0] + nlls[1]) / 2


def _worst(ref: ScoreMap, other: ScoreMap, keys: tuple[str, ...]) -> float:
    return max(float((getattr(ref.layers[n], k) - getattr(other.layers[n], k)).abs().max())
               for n in ref.layers for k in keys)


def _assert_identical(ref: ScoreMap, other: ScoreMap, what: str) -> None:
    assert other.metadata["steps"] == ref.metadata["steps"], what
    for name, lf in ref.layers.items():
        lo = other.layers[name]
        for key in ("U", "s", "Vh", "scores", "lora_A", "lora_B"):
            assert torch.equal(getattr(lf, key), getattr(lo, key)), (what, name, key)


def _assert_close(ref: ScoreMap, other: ScoreMap, what: str) -> None:
    print(f"{what}: max |Δscore| {_worst(ref, other, ('scores',)):.1e}, "
          f"max |ΔLoRA| {_worst(ref, other, ('lora_A', 'lora_B')):.1e}")
    assert other.metadata["steps"] == ref.metadata["steps"], what
    assert other.metadata["acip_steps"] == ref.metadata["acip_steps"], what
    assert other.metadata["stop_reached"] and ref.metadata["stop_reached"], what
    for name, lf in ref.layers.items():
        lo = other.layers[name]
        assert torch.equal(lf.U, lo.U) and torch.equal(lf.s, lo.s) and torch.equal(lf.Vh, lo.Vh), (what, name)
        torch.testing.assert_close(lo.scores, lf.scores, rtol=0, atol=ATOL_SCORES,
                                   msg=lambda m, name=name: f"{what} {name}.scores: {m}")
        pruned = lf.scores <= 0  # pruned entries score −(steps since pruning): exact
        assert torch.equal(pruned, lo.scores <= 0), (what, name)
        assert torch.equal(lf.scores[pruned], lo.scores[pruned]), (what, name)
        for key in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(lo, key), getattr(lf, key), rtol=0, atol=ATOL_LORA,
                                       msg=lambda m, name=name, key=key: f"{what} {name}.{key}: {m}")
    for size in (ref.min_size() + 0.01, 0.7, 0.8, 0.9):
        assert other.ranks(size) == ref.ranks(size), (what, size)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, hence the same bits (and no spinning)
    yield
    torch.set_num_threads(before)


def test_fsdp_scoring_matches_one_process(tmp_path, monkeypatch):
    # Fresh ids every run; the seed is in every failure message, ACIP_FSDP_TEST_SEED reruns one.
    seed = int(os.environ.get("ACIP_FSDP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    calib = torch.randint(0, VOCAB, (12, 24), generator=torch.Generator().manual_seed(seed))
    torch.save(calib, tmp_path / "calib.pt")
    t0 = time.perf_counter()
    reference = run_acip(make_tiny_llama(), calib, _config())
    # A one-process checkpoint, paused, for the two processes to resume.
    with pytest.raises(ACIPPaused):
        run_acip(make_tiny_llama(), calib, _config(checkpoint_dir=str(tmp_path / "ckpt_single")),
                 callback=lambda info: "pause" if info["step"] == PAUSE_AT else None)
    with monkeypatch.context() as patch:
        patch.setattr("compress.methods.acip.train._step_body", _two_rank_step)
        two_rank_order = run_acip(make_tiny_llama(), calib, _config())
    single_seconds = time.perf_counter() - t0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "tests.compress.test_acip_fsdp", str(tmp_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    launch_seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"calibration seed {seed}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    print(f"one-process runs {single_seconds:.1f} s, torchrun launch (4 two-process runs) {launch_seconds:.1f} s")

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, facts in enumerate(ranks):
        # The frozen factors are sharded: a U of `out` rows keeps ⌈out/2⌉ or ⌊out/2⌋ of them here,
        # and every frozen tensor of the scoring model is a shard.
        out_rows, k = facts["U_full_shape"]
        assert facts["U_local_shape"][1] == k and facts["U_local_shape"][0] in (out_rows // 2, (out_rows + 1) // 2)
        assert facts["unsharded_frozen"] == [], facts["unsharded_frozen"]
        assert abs(facts["local_fraction"] - 0.5) < 0.02, facts["local_fraction"]
        # Only LoRA requires grad in the model (the mask vector lives outside it); no frozen tensor got one.
        assert facts["trainable"] and all(n.endswith(("lora_A", "lora_B")) for n in facts["trainable"])
        assert facts["mask_requires_grad"] and facts["frozen_grads"] == []
        # The caller's model comes back untouched: plain parameters, same outputs.
        assert facts["model_unchanged"], r
        assert "multiple of 2" in facts["batch_error"] and "cuda_graphs" in facts["graph_error"]

    fsdp = ScoreMap.load(tmp_path / "fsdp")
    assert fsdp.metadata["distributed"]["world_size"] == 2
    _assert_identical(two_rank_order, fsdp, f"2 processes vs 1 in their reduction order (calibration seed {seed})")
    _assert_close(reference, fsdp, f"2 processes vs 1 (calibration seed {seed})")
    # Only rank 0 wrote the checkpoint, with both ranks' RNG states, atomically; one process resumes it.
    state = torch.load(tmp_path / "ckpt_fsdp" / "state.pt", weights_only=True)
    assert state["step"] == PAUSE_AT and len(state["rng_ranks"]) == 2
    assert not list((tmp_path / "ckpt_fsdp").glob("*.tmp"))
    resumed = run_acip(make_tiny_llama(), calib, _config(checkpoint_dir=str(tmp_path / "ckpt_fsdp"), resume=True))
    _assert_close(reference, resumed, f"2-process checkpoint resumed by 1 (calibration seed {seed})")
    # ... and two processes resumed the one-process checkpoint.
    _assert_close(reference, ScoreMap.load(tmp_path / "fsdp_resumed"),
                  f"1-process checkpoint resumed by 2 (calibration seed {seed})")


def test_cli_under_accelerate_launch(tiny_model_dir, tmp_path):
    # The documented command. `--multi_gpu` is accelerate's torchrun launcher; without GPUs the
    # processes run on the CPU over gloo (`--cpu` would start one process).
    import shutil

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    data = tmp_path / "calib.txt"
    data.write_text("pack my box with five dozen liquor jugs. " * 60)
    opts = [f"{k}={v}" for k, v in SETTINGS.items() if k not in ("batch_size", "checkpoint_every", "seed")]
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "compress", "--model", str(tiny_model_dir), "--device", "cpu", "--method", "acip", "--size", "0.8",
           "--data", str(data), "--seq-len", "24", "--calib-samples", "8", "--batch-size", "4", "--no-eval",
           "--save-plan", str(tmp_path / "plan"), "--out", str(tmp_path / "out")]
    for opt in opts:
        cmd += ["--method-opt", opt]
    # HF_HOME: no accelerate config of the user's (e.g. one selecting FSDP1 or DeepSpeed) applies.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    plan = ScoreMap.load(tmp_path / "plan")
    assert plan.metadata["distributed"]["world_size"] == 2 and plan.metadata["distributed"]["backend"] == "gloo"
    assert len(torch.load(tmp_path / "plan" / "checkpoint" / "state.pt", weights_only=True)["rng_ranks"]) == 2
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert abs(report["target_fraction"] - 0.8) < 0.01
    assert proc.stdout.count('"target_fraction"') == 1  # rank 0 alone reports (and saves)


def test_distributed_settings_are_checked():
    calib = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="distributed must be"):
        run_acip(make_tiny_llama(), calib, _config(distributed="ddp"))
    with pytest.raises(UserError, match="launcher"):
        run_acip(make_tiny_llama(), calib, _config(distributed="fsdp"))


# ---------------------------------------------------------------------------- the torchrun worker
def _worker(workdir: Path) -> None:
    """One of the two processes: the runs the test compares, and facts about the sharding."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import compress.methods.acip.train as train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    calib = torch.load(workdir / "calib.pt")
    facts: dict = {}
    seen: dict = {}
    real_shard = train.shard_for_scoring

    def inspecting_shard(net, layers, trainable, mesh):
        summary = real_shard(net, layers, trainable, mesh)
        if not facts:
            first = next(iter(layers.values()))
            facts["U_full_shape"] = list(first.U.shape)
            facts["U_local_shape"] = list(first.U.to_local().shape)
            facts["unsharded_frozen"] = [n for n, p in net.named_parameters()
                                         if not p.requires_grad and not isinstance(p, DTensor)]
            facts["trainable"] = [n for n, p in net.named_parameters() if p.requires_grad]
            facts["mask_requires_grad"] = first.bank.p.requires_grad
            facts["local_fraction"] = summary["local_fraction"]
            seen["net"] = net
        return summary

    train.shard_for_scoring = inspecting_shard
    model = make_tiny_llama()
    ids = calib[:2]
    with torch.no_grad():
        before = model(ids).logits
    result = run_acip(model, calib, _config())  # the process group is initialised from torchrun's environment
    net = seen.pop("net")
    facts["frozen_grads"] = [n for n, p in net.named_parameters() if not p.requires_grad and p.grad is not None]
    del net
    with torch.no_grad():
        same = torch.equal(model(ids).logits, before)
    plain = all(type(p) is torch.nn.Parameter for p in model.parameters())
    facts["model_unchanged"] = bool(same and plain and "FSDP" not in type(model).__name__)
    if rank == 0:
        result.save(workdir / "fsdp")

    # Rank 0's callback pauses; rank 1 must stop at the same step.
    try:
        run_acip(make_tiny_llama(), calib, _config(checkpoint_dir=str(workdir / "ckpt_fsdp")),
                 callback=lambda info: "pause" if info["step"] == PAUSE_AT else None)
        raise AssertionError("the pause was not shared with every rank")
    except ACIPPaused:
        pass
    resumed = run_acip(make_tiny_llama(), calib, _config(checkpoint_dir=str(workdir / "ckpt_single"), resume=True))
    if rank == 0:
        resumed.save(workdir / "fsdp_resumed")

    for key, bad in (("batch_error", dict(batch_size=3)), ("graph_error", dict(cuda_graphs=True))):
        try:
            run_acip(make_tiny_llama(), calib, _config(**bad))
            facts[key] = ""
        except UserError as exc:
            facts[key] = str(exc)
    (workdir / f"rank{rank}.json").write_text(json.dumps(facts))
    dist.barrier()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
