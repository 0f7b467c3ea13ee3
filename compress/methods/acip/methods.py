"""`acip` and `svd-magnitude`: methods whose plan is a score map, materializable at any size.

`acip` trains masks on the singular values of every targeted linear (plus LoRA branches)
with a growing L1 penalty and records the pruning order (compress.methods.acip.train). By default the
singular values are those of the whitened weight W·S (S: Cholesky factor of the layer's
calibration input Gram, as in `svd`); `--method-opt basis=plain` gives the paper's plain SVD.
Under `torchrun` / `accelerate launch` the scoring runs on all processes with the frozen model
sharded by FSDP2 (`--method-opt distributed=auto|none|fsdp`; docs/acip.md, "Multi-GPU scoring").
`svd-magnitude` ranks the same triplets by their singular values alone: the score map ACIP
starts from, with no data and no LoRA. Both use global allocation: one ranking across all
layers decides what every layer keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from compress.errors import UserError
from compress.methods import register_method
from compress.methods.acip.scoremap import ScoreMap, ScoreMapLayer, model_identity
from compress.methods.acip.train import ACIPConfig, compute_svd_factors, run_acip
from lowrank.surgery import target_linears

__all__ = ["SVDMagnitudeConfig", "score_acip", "score_svd_magnitude"]


@register_method("acip", ACIPConfig,
                 "ACIP: learn a global score map over singular values (any size from one run)",
                 materialize_options=("reset",))
def score_acip(model: nn.Module, chunks: Tensor, config: ACIPConfig) -> ScoreMap:
    return run_acip(model, chunks, config)


@dataclass
class SVDMagnitudeConfig:
    svd_dtype: str = "float32"
    factor_dtype: str = "float32"
    progress: bool = True


@register_method("svd-magnitude", SVDMagnitudeConfig,
                 "plain SVD, singular values ranked globally across layers (no data)",
                 needs_calibration=False, materialize_options=("reset",))
def score_svd_magnitude(model: nn.Module, chunks: Tensor | None, config: SVDMagnitudeConfig) -> ScoreMap:
    names = [n for n, m in target_linears(model).items() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError("svd-magnitude found no dense target linears (is the model already compressed?)")
    factors = compute_svd_factors(model, names, svd_dtype=config.svd_dtype, factor_dtype=config.factor_dtype,
                                  progress=config.progress)
    layers = {n: ScoreMapLayer(U, s, Vh, s.float().clone()) for n, (U, s, Vh) in factors.items()}
    return ScoreMap("svd-magnitude", layers, model_identity(model, names), 0.0, "all", {})
