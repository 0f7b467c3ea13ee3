"""SVD baselines: activation-aware (whitened, as in SVD-LLM) and plain truncation.

`svd` (default): for a layer W [out, in] with calibration inputs X, let G = XᵀX = S·Sᵀ
(Cholesky). Truncating the SVD of W·S minimises ‖(W − W')·Xᵀ‖, the error on the layer's
actual outputs, rather than ‖W − W'‖. With W·S = Û·Σ·Q̂ᵀ the rank-r layer is
W' = Û_r·Σ_r·(Q̂_rᵀ·S⁻¹), stored as balanced factors (the math: `compress.whitening`).
Ranks are uniform: every layer keeps the same fraction of its own parameters. No healing.

`svd-plain`: truncated SVD of W itself, for reference (it is useless on real LLMs: the
spectrum of W says nothing about which directions the inputs use).

If G is not positive definite (dead input features, too few tokens), the Cholesky is retried
with damping δ·mean(diag G)·I for δ = 1e-6, 1e-5, ..., 1e-1, and the δ used is recorded.
A non-finite Gram is an error that names the layer.

`gram_shrink` = α whitens by (1 − α)·G + α·mean(diag G)·I (`compress.whitening.shrink_gram`): α = 0 is the
above, α = 1 the plain SVD of W. A small α keeps the truncation from fitting the calibration
domain's input statistics too closely (docs/domains.md).

`offload=True` (`--offload`): the weights stay in CPU memory and calibration goes block by
block (`compress.calibrate.blockwise_input_grams` under `compress.streaming.offloaded`): one
block's weights and Grams are on the accelerator, its layers are factorized there, the factors
go to the CPU, then the next block. The plan is the same as without offload.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from compress.calibrate import blockwise_input_grams, collect_input_grams
from compress.methods import check_shrink, register_method
from compress.plan import FactorPlan, LayerFactors
from compress.streaming import is_offloaded, maybe_offloaded
from compress.whitening import whitened_svd_factors
from lowrank.linear import svd_factors
from lowrank.surgery import target_linears

__all__ = ["PlainSVDConfig", "SVDConfig", "score_svd", "score_svd_plain"]


@dataclass
class SVDConfig:
    batch_size: int = 4
    progress: bool = True
    offload: bool = False  # weights in CPU memory, one decoder block at a time on the accelerator
    # Shrink the whitening Gram toward a multiple of I: G_a = (1 - a)·G + a·mean(diag G)·I.
    # 0 = SVD-LLM's whitening (fits the calibration domain closely); 1 = the plain SVD of W.
    gram_shrink: float = 0.0

    def __post_init__(self) -> None:
        check_shrink(self.gram_shrink)


@register_method("svd", SVDConfig, "activation-aware (whitened) truncated SVD with uniform ranks, as in SVD-LLM")
def score_svd(model, chunks: Tensor, config: SVDConfig) -> FactorPlan:
    with maybe_offloaded(model, config.offload):
        if is_offloaded(model):
            return _score_svd_blockwise(model, chunks, config)
        targets = target_linears(model)
        grams = collect_input_grams(model, chunks, targets, batch_size=config.batch_size, progress=config.progress)
        layers: dict[str, LayerFactors] = {}
        dampings: dict[str, float] = {}
        items = targets.items()
        if config.progress:
            from tqdm.auto import tqdm

            items = tqdm(list(items), desc="whitened SVD", unit="layer", leave=False)
        for name, module in items:
            _factor_layer(name, module, grams[name], layers, dampings, config.gram_shrink)
        meta = {"calibration_tokens": grams.tokens, "damped_layers": dampings}
        if config.gram_shrink:
            meta["gram_shrink"] = config.gram_shrink
        return FactorPlan("svd", layers, allocation="uniform", metadata=meta)


def _factor_layer(name: str, module, gram: Tensor, layers: dict[str, LayerFactors], dampings: dict[str, float],
                  shrink: float = 0.0) -> None:
    U, V, s, damping = whitened_svd_factors(module.weight, gram, name, shrink)
    layers[name] = LayerFactors(U.cpu(), V.cpu(), s.cpu(), module.weight.detach().float().cpu())
    if damping:
        dampings[name] = damping


def _score_svd_blockwise(model, chunks: Tensor, config: SVDConfig) -> FactorPlan:
    """Grams and factors one block at a time; while a block is held, `module.weight` is on the accelerator."""
    targets = target_linears(model)
    layers: dict[str, LayerFactors] = {}
    dampings: dict[str, float] = {}
    tokens = int(chunks.numel())
    for _, grams in blockwise_input_grams(model, chunks, targets, batch_size=config.batch_size,
                                          progress=config.progress, desc="svd: calibrate + factorize"):
        for name in grams:
            _factor_layer(name, model.get_submodule(name), grams[name], layers, dampings, config.gram_shrink)
        tokens = grams.tokens
    # Same layer order as the whole-model pass (plans are compared and saved in this order).
    layers = {name: layers[name] for name in targets}
    dampings = {name: dampings[name] for name in targets if name in dampings}
    meta = {"calibration_tokens": tokens, "damped_layers": dampings}
    if config.gram_shrink:
        meta["gram_shrink"] = config.gram_shrink
    return FactorPlan("svd", layers, allocation="uniform", metadata=meta)


@dataclass
class PlainSVDConfig:
    progress: bool = True


@register_method("svd-plain", PlainSVDConfig, "plain truncated SVD of W (reference; no calibration)",
                 needs_calibration=False)
def score_svd_plain(model, chunks: Tensor | None, config: PlainSVDConfig) -> FactorPlan:
    layers = {}
    for name, module in target_linears(model).items():
        U, V = svd_factors(module.weight)
        s = (U.norm(dim=0) * V.norm(dim=1)).float()  # = singular values for balanced factors
        layers[name] = LayerFactors(U.cpu(), V.cpu(), s.cpu(), module.weight.detach().float().cpu())
    return FactorPlan("svd-plain", layers, allocation="uniform")
