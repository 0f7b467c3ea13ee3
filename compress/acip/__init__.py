"""ACIP (Genzel et al. 2025, "Choose Your Model Size"): score once, materialize any size.

- `functional`: the algorithm's math as pure tensor functions;
- `layer`: the masked SVD layer used while scoring (runs on `lowrank_kernels.lowrank_matmul`);
- `train`: the scoring run (training loop, checkpoints, resume);
- `distributed`: the same run over several processes (FSDP2; torchrun / accelerate launch);
- `scoremap`: the score-map artifact and any-size materialization.

See docs/acip.md.
"""

from compress.acip.scoremap import ScoreMap, ScoreMapMismatch, load_any_plan, temporarily_materialized
from compress.acip.train import ACIPConfig, ACIPPaused, run_acip

__all__ = [
    "ACIPConfig",
    "ACIPPaused",
    "ScoreMap",
    "ScoreMapMismatch",
    "load_any_plan",
    "run_acip",
    "temporarily_materialized",
]
