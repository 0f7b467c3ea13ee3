"""`compress.api` called directly: `compress`, `score`, `load_plan`, and the `Plan` protocol every plan follows."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compress.api import check_size, compress, load_plan, score
from compress.errors import UserError
from compress.methods import available_methods, get_method
from compress.methods.acip import ScoreMap
from compress.plan import PLAN_TYPES, FactorPlan, Plan, SizesCovered, recorded_plan_type
from lowrank import LowRankLinear, size_report, target_linears

CALIBRATION = dict(seq_len=32, num_samples=4, progress=False)


@pytest.fixture
def loaded(tiny_model_dir):
    """The tiny random Llama and its trained BPE tokenizer (conftest.tiny_model_dir), in float32 on the CPU."""
    from compress.model import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        return model(ids).logits


def test_compress_scores_materializes_and_reports(loaded, cli_text):
    model, tokenizer = loaded
    reference = copy.deepcopy(model)
    dense = size_report(model)
    result = compress(model, tokenizer, "svd", 0.5, data=str(cli_text), **CALIBRATION)

    plan = result.plan
    assert isinstance(plan, Plan) and isinstance(plan, FactorPlan) and plan.method == "svd"
    assert plan.supports_any_size and 0.05 in plan.sizes_covered
    # Uniform allocation: every layer keeps half of its own parameters, r = ⌊0.5·m·n / (m + n)⌋.
    targets = target_linears(model)
    assert set(result.ranks) == set(targets) == set(target_linears(reference))
    for name, rank in result.ranks.items():
        out_f, in_f = targets[name].out_features, targets[name].in_features
        assert rank == int(0.5 * out_f * in_f / (out_f + in_f)), name
        assert isinstance(targets[name], LowRankLinear) and targets[name].rank == rank, name
    # The report is the compressed model's own, against the dense model it came from.
    assert result.report == size_report(model)
    assert result.report.target_dense_params == dense.target_params
    assert result.report.target_params == sum(
        rank * (targets[n].out_features + targets[n].in_features) for n, rank in result.ranks.items())
    assert 0.48 <= result.report.target_fraction <= 0.5  # each rank rounded down
    assert result.report.model_params < dense.model_params
    assert result.score_seconds > 0 and result.materialize_seconds > 0

    # compress = score + materialize_: the same calibration gives the same model, bit for bit.
    again = score(reference, tokenizer, "svd", data=str(cli_text), **CALIBRATION)
    assert again.materialize_(reference, 0.5) == result.ranks
    assert torch.equal(_logits(model), _logits(reference))


def test_compress_hooks_and_materialize_options(loaded):
    model, tokenizer = loaded
    dense_logits = _logits(model)
    seen = []

    def after_scoring(plan: Plan) -> None:
        # Called once, with the plan, before anything in the model changed.
        assert not any(isinstance(m, LowRankLinear) for m in target_linears(model).values())
        seen.append(plan)

    scored_only = compress(model, tokenizer, "svd-magnitude", 0.6, after_scoring=after_scoring, materialize=False,
                           progress=False)
    assert seen == [scored_only.plan] and isinstance(scored_only.plan, ScoreMap)
    assert scored_only.report is None and scored_only.ranks == {} and scored_only.materialize_seconds == 0.0
    assert torch.equal(_logits(model), dense_logits)

    # At size 1 the reset rule (on by default) keeps the original layers; reset=False rebuilds each one.
    kept, rebuilt = copy.deepcopy(model), copy.deepcopy(model)
    originals = [dict(target_linears(m)) for m in (kept, rebuilt)]
    with_reset = compress(kept, tokenizer, "svd-magnitude", 1.0, progress=False)
    without = compress(rebuilt, tokenizer, "svd-magnitude", 1.0, materialize_options={"reset": False},
                       progress=False)
    assert with_reset.ranks == without.ranks and with_reset.report.target_fraction == 1.0
    assert all(m is originals[0][n] for n, m in target_linears(kept).items())
    assert all(type(m) is nn.Linear and m is not originals[1][n] for n, m in target_linears(rebuilt).items())
    torch.testing.assert_close(_logits(rebuilt), dense_logits)

    with pytest.raises(ValueError, match="'svd-plain'.*'reset'"):
        compress(copy.deepcopy(model), tokenizer, "svd-plain", 0.5, materialize_options={"reset": True},
                 progress=False)


@pytest.mark.parametrize("size", [0, 1.5, -0.1, "0.5"])
def test_sizes_are_refused_in_plain_words(loaded, size):
    model, tokenizer = loaded
    with pytest.raises(ValueError) as info:
        compress(model, tokenizer, "svd-plain", size, progress=False)
    assert str(info.value) == f"size must be a fraction in (0, 1], got {size}"
    assert not isinstance(info.value, UserError) and "--" not in str(info.value)
    assert check_size(1) == 1.0 and check_size(0.25) == 0.25


def test_load_plan_reads_the_type_each_directory_records(loaded, tmp_path):
    model, tokenizer = loaded
    factors = score(model, tokenizer, "svd-plain", progress=False)
    magnitude = score(model, tokenizer, "svd-magnitude", progress=False)
    factors.save(tmp_path / "factors")
    magnitude.save(tmp_path / "magnitude")
    assert recorded_plan_type(tmp_path / "factors") == "FactorPlan"
    assert recorded_plan_type(tmp_path / "magnitude") == "scoremap"
    assert type(load_plan(tmp_path / "factors")) is FactorPlan
    assert type(load_plan(tmp_path / "magnitude")) is ScoreMap

    # Directories written before plans recorded their type load as what they hold.
    for name, plan_file in (("factors", "plan.json"), ("magnitude", "scoremap.json")):
        path = tmp_path / name / plan_file
        meta = json.loads(path.read_text())
        del meta["plan_type"]
        path.write_text(json.dumps(meta))
    old_factors, old_map = load_plan(tmp_path / "factors"), load_plan(tmp_path / "magnitude")
    assert type(old_factors) is FactorPlan and type(old_map) is ScoreMap
    assert old_factors.ranks(0.4) == factors.ranks(0.4) and old_map.ranks(0.4) == magnitude.ranks(0.4)

    path = tmp_path / "factors" / "plan.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "plan_type": "NoSuchPlan"}))
    with pytest.raises(UserError, match="unknown plan type 'NoSuchPlan'"):
        load_plan(tmp_path / "factors")
    with pytest.raises(UserError, match="not found"):
        load_plan(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a plan directory"):
        load_plan(tmp_path / "empty")


def test_every_plan_type_follows_the_protocol():
    available_methods()  # registers every built-in plan type
    assert {"FactorPlan", "SVDLLMPlan", "ASVDPlan", "scoremap", "minify", "surgeon"} <= set(PLAN_TYPES)
    for name, cls in PLAN_TYPES.items():
        assert cls.plan_type == name
        for member in ("materialize_", "save", "load", "sizes_covered", "supports_any_size"):
            assert hasattr(cls, member), (name, member)
        assert isinstance(cls.sizes_covered, property) and isinstance(cls.supports_any_size, property), name
    assert get_method("acip").materialize_options == ("reset",)
    assert get_method("svd").materialize_options == ()


def test_sizes_covered_words_its_refusals():
    anything = SizesCovered()
    assert 0.01 in anything and 1.0 in anything and "0.5" not in anything
    ranged = SizesCovered(lowest=0.4, owner="this score map", limit="rescore to go lower")
    assert 0.396 in ranged and 0.39 not in ranged
    assert ranged.refusal([0.3, 0.5]) == "size 0.3 is below what this score map covers: rescore to go lower"
    assert ranged.refusal([0.3, 0.2]) == "sizes [0.3, 0.2] are below what this score map covers: rescore to go lower"
    fixed = SizesCovered(only=(0.5,), owner="surgeon structure '2:4'")
    assert 0.5 in fixed and 0.6 not in fixed
    assert fixed.refusal([0.6]) == "size 0.6 is not among the sizes surgeon structure '2:4' covers (0.5)"
    nothing = SizesCovered(only=())
    assert 0.5 not in nothing and nothing.refusal([0.5]) == "size 0.5 is not among the sizes this plan covers (none)"
