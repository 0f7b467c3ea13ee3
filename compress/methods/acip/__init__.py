"""ACIP (Genzel et al. 2025, "Choose Your Model Size"): score once, materialize any size.

- `functional`: the algorithm's math as pure tensor functions;
- `layer`: the masked SVD layer used while scoring (runs on `lowrank_kernels.lowrank_matmul`);
- `train`: the scoring run (training loop, checkpoints, resume);
- `distributed`: the same run over several processes (FSDP2; torchrun / accelerate launch);
- `scoremap`: the score-map artifact and any-size materialization;
- `methods`: the registered methods `acip` and `svd-magnitude` (importing this package registers them).

See docs/acip.md.
"""

from compress.methods.acip.methods import SVDMagnitudeConfig, score_acip, score_svd_magnitude
from compress.methods.acip.scoremap import ScoreMap, ScoreMapMismatch
from compress.methods.acip.train import ACIPConfig, ACIPPaused, run_acip

__all__ = [
    "ACIPConfig",
    "ACIPPaused",
    "SVDMagnitudeConfig",
    "ScoreMap",
    "ScoreMapMismatch",
    "run_acip",
    "score_acip",
    "score_svd_magnitude",
]
