"""bench.quality.materialize_time: its random score map materializes what select promises; bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from bench.quality import materialize_time as bench
from lowrank.linear import LowRankLinear
from lowrank.surgery import size_report


def test_random_map_materializes_the_selected_size():
    model = bench.build_model("tiny", "cpu", torch.float32)
    score_map, originals = bench.random_score_map(model, lora_rank=4, seed=int(torch.randint(0, 2**31, ())))
    size = 0.6
    ranks = score_map.ranks(size)
    score_map.materialize_(model, size, check=False)
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if isinstance(layer, LowRankLinear):
            assert layer.rank == rank  # kept triplets plus the folded LoRA, as select counts them
    assert size_report(model).target_fraction == pytest.approx(score_map.size_at(size), abs=1e-6)


def test_cli_writes_one_row_per_size(tmp_path, capsys):
    assert bench.main(["--shapes", "tiny", "--sizes", "0.8,0.5", "--device", "cpu", "--dtype", "float32",
                       "--repeats", "1", "--lora-rank", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "materialize_time_cpu.json").read_text())
    rows = result["shapes"]["tiny"]["sizes"]
    assert [r["size"] for r in rows] == [0.8, 0.5]
    assert all(r["seconds_median"] > 0 and r["low_rank_layers"] + r["dense_layers"] == 14 for r in rows)
    assert result["env"]["torch"] == torch.__version__
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "nope"], "unknown shape"),
    (["--sizes", "0.5,x"], "comma list of numbers"),
    (["--sizes", "1.5"], "in (0, 1]"),
    (["--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
