"""bench.tools.merge_family: methods of separate family_quality runs merge into one file only when both runs
measured the same model, windows and dense perplexities; each merged method keeps its own env and gets a note."""

from __future__ import annotations

import json
import random

import pytest

from bench.tools import merge_family as mf


def _run(gpu: str, methods: dict[str, float]) -> dict:
    """A family_quality-shaped result with fresh random perplexities (method -> test perplexity)."""
    rng = random.Random()
    dense = {name: rng.uniform(5.0, 50.0) for name in ("test", "legal", "code")}
    env = {"gpu": gpu, "timestamp_utc": "2026-12-07T14:00:00+00:00", "git_commit": f"{rng.getrandbits(64):016x}"}
    return {
        "bench": "family_quality", "env": env,
        "model": {"source": "tiny", "model_type": "gemma3_text", "params": 1000, "target_params": 600},
        "protocol": {"bos": "auto", "window_prefix": 2, "seq_len": 32, "scored_tokens_per_window": 32,
                     "calibration": "8 x 32 tokens", "eval": {"test": "test.txt, 4 windows"}},
        "dense": {name: {"perplexity": v, "window_nll": [rng.random() for _ in range(4)]} for name, v in dense.items()},
        "methods": {m: {"env": env, "points": [{"requested": 0.8, "eval": {"test": {"perplexity": p}}}]}
                    for m, p in methods.items()},
        "refused": {}, "notes": [],
    }


def test_merge_copies_methods_with_their_env_and_a_note():
    target = _run("NVIDIA H200", {"svd": random.uniform(50, 90)})
    source = _run("NVIDIA H100 80GB HBM3", {"acip": random.uniform(40, 60), "surgeon": random.uniform(40, 60)})
    source["dense"] = json.loads(json.dumps(target["dense"]))  # same dense scores, as two runs of one protocol
    expected = json.loads(json.dumps(source["methods"]))
    merged = mf.merge_family(target, source, methods=["acip"])
    assert merged == ["acip"]
    assert target["methods"]["acip"] == expected["acip"]
    assert target["methods"]["acip"]["env"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert "surgeon" not in target["methods"] and "svd" in target["methods"]
    assert target["env"]["gpu"] == "NVIDIA H200"  # the file's own env is the target run's
    assert len(target["notes"]) == 1 and target["notes"][0].startswith("acip: measured on NVIDIA H100")


def test_merge_refuses_other_dense_protocol_or_clash():
    target = _run("NVIDIA H200", {"svd": random.uniform(50, 90)})
    other = _run("NVIDIA H100", {"acip": random.uniform(40, 60)})  # its own random dense: differs by far
    with pytest.raises(mf.MergeError, match="dense perplexity on"):
        mf.merge_family(target, other)
    same_dense = json.loads(json.dumps(other))
    same_dense["dense"] = json.loads(json.dumps(target["dense"]))
    shifted = json.loads(json.dumps(same_dense))
    shifted["protocol"]["seq_len"] = 64
    with pytest.raises(mf.MergeError, match="protocol seq_len"):
        mf.merge_family(target, shifted)
    clash = json.loads(json.dumps(same_dense))
    clash["methods"]["svd"] = clash["methods"].pop("acip")
    with pytest.raises(mf.MergeError, match="already has svd"):
        mf.merge_family(target, clash)
    with pytest.raises(mf.MergeError, match="no result for surgeon"):
        mf.merge_family(target, same_dense, methods=["surgeon"])
    before = json.dumps(target, sort_keys=True)
    assert mf.merge_family(target, clash, replace=True) == ["svd"]
    assert json.dumps(target, sort_keys=True) != before


def test_cli_writes_atomically_and_errors_in_one_line(tmp_path, capsys):
    target = _run("NVIDIA H200", {"svd": random.uniform(50, 90)})
    source = _run("NVIDIA H100", {"acip": random.uniform(40, 60)})
    tpath, spath = tmp_path / "t.json", tmp_path / "s.json"
    tpath.write_text(json.dumps(target))
    spath.write_text(json.dumps(source))
    assert mf.main([str(tpath), str(spath)]) == 2  # dense differs
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge_family: error: dense perplexity") and "\n" not in err
    assert json.loads(tpath.read_text()) == target  # untouched
    source["dense"] = target["dense"]
    spath.write_text(json.dumps(source))
    assert mf.main([str(tpath), str(spath), "--methods", "acip"]) == 0
    assert set(json.loads(tpath.read_text())["methods"]) == {"svd", "acip"}
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob("*.tmp"))


def test_rename_merges_a_variant_beside_the_method(tmp_path, capsys):
    target = _run("NVIDIA H200", {"acip": random.uniform(50, 90)})
    source = _run("NVIDIA H100", {"acip": random.uniform(40, 60)})
    source["dense"] = json.loads(json.dumps(target["dense"]))
    kept, variant = json.loads(json.dumps(target["methods"]["acip"])), json.loads(json.dumps(source["methods"]["acip"]))
    with pytest.raises(mf.MergeError, match="already has acip"):
        mf.merge_family(json.loads(json.dumps(target)), source)
    with pytest.raises(mf.MergeError, match="not among the methods merged"):
        mf.merge_family(json.loads(json.dumps(target)), source, rename={"svd": "svd-x"})
    assert mf.merge_family(target, source, rename={"acip": "acip-any"}) == ["acip-any"]
    assert target["methods"]["acip"] == kept and target["methods"]["acip-any"] == variant
    assert target["notes"][-1].startswith("acip-any (the source's acip): measured on NVIDIA H100")
    tpath, spath = tmp_path / "t.json", tmp_path / "s.json"
    tpath.write_text(json.dumps(target))
    spath.write_text(json.dumps(source))
    assert mf.main([str(tpath), str(spath), "--rename", "acip"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "merge_family: error: --rename takes OLD=NEW, got 'acip'"
    assert mf.main([str(tpath), str(spath), "--rename", "acip=acip-b"]) == 0
    assert set(json.loads(tpath.read_text())["methods"]) == {"acip", "acip-any", "acip-b"}
