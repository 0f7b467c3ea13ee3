"""ACIP's scoring run: the training loop around the pure functions in `compress.methods.acip.functional`.

1. Every targeted linear is replaced by `MaskedSVDLinear` (its SVD, a mask per singular value,
   a LoRA branch); the original `nn.Linear`s are kept aside and put back at the end. With
   ``basis="whitened"`` the SVD is that of W·S, S the Cholesky factor of the layer's calibration
   input Gram (SVD-LLM's whitening; a deviation from the paper, see docs/acip.md).
2. Masks and LoRA train with AdamW on next-token NLL + λ·Σ relu(p), λ growing geometrically,
   until the targeted layers' size ratio reaches the stop ratio; the score map is updated after
   every step. LoRA alone is then post-tuned with the scores frozen: by default each step under the
   masks of a size drawn between the stop ratio and 1 (`post_tune_size="any"`), since the one LoRA
   serves every size the score map materializes; the paper post-tunes at the stop ratio (`"stop"`).
3. The result is a `ScoreMap` (the SVD factors, the scores and the LoRA branches).

Objectives that keep the model general (docs/domains.md): `distill` (on by default since the
out-of-domain ablations, `distill=1`) adds a KL term toward the same network with every mask on and
no LoRA (the dense model, so no second copy);
`holdout` keeps calibration chunks out of training and early-stops the post-tuning on their NLL,
restoring the best LoRA; `gram_shrink` regularizes the whitening Gram toward the plain basis.

Checkpoints (`checkpoint_dir`, every `checkpoint_every` steps, on Ctrl-C and at the end) hold
everything the next step depends on: masks, scores, LoRA, optimizer state, step counters,
RNG states and the data position; the SVD factors are written once. `resume=True` continues
from one and ends exactly where an uninterrupted run with the same seed ends. A callback can
also ask for a pause (checkpoint, then `ACIPPaused`), e.g. to split a run over time-limited jobs.

`cuda_graphs=True` replays each phase's training step as one CUDA graph: on a small model the
eager step is bound by Python and kernel-launch overhead, not by the GPU.

Under ``torchrun`` / ``accelerate launch`` (``distributed="auto"`` or ``"fsdp"``) the frozen
model is sharded with FSDP2 and each process takes its slice of every batch; the orchestration
lives in `compress.methods.acip.distributed`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress.distill import check_distill, distill_loss, training_loss
from compress.errors import UserError
from compress.methods import check_shrink
from compress.methods.acip.distributed import DistributedRun, resolve_mode, scoring_copy, shard_for_scoring
from compress.methods.acip.functional import (
    Segments,
    alive_counts,
    l1_penalty,
    post_tune_masks,
    reg_weight,
    size_for_counts,
    update_scores,
)
from compress.methods.acip.layer import MaskBank, MaskedSVDLinear
from compress.methods.acip.scoremap import ScoreMap, ScoreMapLayer, check_identity, model_identity
from lowrank.checkpoint import apply_umask_permissions
from lowrank.faults import fault_point
from lowrank.surgery import replace_module_, target_linears

__all__ = ["ACIPConfig", "ACIPPaused", "compute_svd_factors", "compute_whitened_factors", "distill_loss",
           "holdout_nll", "install_masked_layers", "rows_per_pass", "run_acip", "split_holdout",
           "training_step"]

STATE_NAME = "state.pt"
FACTORS_NAME = "factors.safetensors"
META_NAME = "meta.json"
STATE_VERSION = 1

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass
class ACIPConfig:
    """ACIP hyper-parameters; defaults are the paper's / reference implementation's, except the whitened
    basis, `distill=1`, `post_tune_steps=200` and `post_tune_size="any"`, which our measurements chose
    (docs/acip.md, docs/domains.md)."""

    stop_ratio: float = 0.4  # stop pruning once the targeted layers hold this fraction of their weights
    lr: float = 5e-5  # AdamW, masks and LoRA alike, no weight decay
    reg_start: float = 1e-3  # λ_0
    reg_update_every: int = 4  # λ ← λ·factor every this many steps
    reg_update_factor: float = 1.01
    mask_scale: float = 2e-2  # initial mask parameter value (and its forward value when unpruned)
    lora_rank: int = 32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # LoRA-only steps after the stop ratio is reached. The paper runs 1000; 200 was better at 90, 80 and 60%
    # on every text, off domain by 10-28% (docs/domains.md), since the post-tuning fits the LoRA to the
    # stop-ratio model and to the calibration set, and one run serves every larger size.
    post_tune_steps: int = 200
    # Which masks the post-tuning trains the LoRA under. stop: the stop-ratio model's (the paper), though
    # the same LoRA then serves every larger size. any: each step draws one of 16 sizes evenly spaced from
    # where pruning stopped to 1 and keeps the entries materializing at that size would keep. any is the
    # default: on Gemma 3 270M it beat stop at 90 and 80% on every text by 18-60%, and stop left Gemma's
    # curve non-monotone in size; on SmolLM2 no post-tuning at all beat stop at every size and text
    # (docs/domains.md), and any beat no post-tuning there too (worst OOD 1.39/2.50/7.01x against 1.49/2.81/8.22x).
    post_tune_size: str = "any"
    batch_size: int = 4
    max_steps: int = 20_000  # safety cap on the pruning phase
    size_includes_lora: bool = True  # count the folded LoRA rank in the size (what is really stored)
    svd_dtype: str = "float32"  # precision of the SVDs (float64 for exactness, slower)
    factor_dtype: str = "float32"  # precision U, s, Vh are stored in (bfloat16 halves the score map)
    basis: str = "whitened"  # whitened: SVD of W·S, S = chol(input Gram) (SVD-LLM); plain: SVD of W (paper)
    whiten_samples: int = 128  # calibration chunks (evenly spaced) whose inputs form the Gram; 0 = all
    gram_shrink: float = 0.0  # whitened basis: Gram (1-a)·G + a·mean(diag G)·I (compress.whitening.shrink_gram)
    # Distillation: loss = NLL + distill·KL(teacher ‖ student) on the next-token distributions, the teacher
    # being the same network with every mask on and no LoRA (= the dense model); 0 = off (the paper's loss).
    # Default 1: off the calibration domain it cut the worst-text ratio at 60% from 11.9 to 7.5 and removed
    # the WikiText-2 markup the LoRA learned at 80% (docs/domains.md, Results), for ~30% more step time.
    distill: float = 1.0
    distill_only: bool = False  # with distill > 0: drop the NLL term (pure distillation)
    # Early stopping of the LoRA post-tuning: `holdout` chunks (a fraction < 1 or a count ≥ 1, evenly spaced
    # over the calibration chunks) are never trained on; every `holdout_every` post-tuning steps their NLL
    # is measured and the LoRA with the lowest is kept; `holdout_patience` evaluations without a gain stop
    # the post-tuning (0 = never stop early, still restore the best). 0 = off.
    holdout: float = 0.0
    holdout_every: int = 50
    holdout_patience: int = 4
    activation_checkpointing: str = "none"  # none | full | selective (keeps the SVD matmul outputs)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 200
    resume: bool = False
    seed: int = 0
    cuda_graphs: bool = False  # replay each phase's step as a CUDA graph (CUDA only; else ignored)
    progress: bool = True
    # auto: FSDP2 when launched with WORLD_SIZE > 1 (torchrun / accelerate launch), else one process;
    # none: one process; fsdp: always FSDP2 (needs a launcher or a process group). See distributed.py.
    distributed: str = "auto"

    def validate(self) -> None:
        if not 0.0 < self.stop_ratio < 1.0:
            raise UserError(f"stop_ratio must be in (0, 1), got {self.stop_ratio}")
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise UserError("activation_checkpointing must be none, full or selective, "
                            f"got {self.activation_checkpointing!r}")
        for key in ("svd_dtype", "factor_dtype"):
            if getattr(self, key) not in _DTYPES:
                raise UserError(f"{key} must be one of {sorted(_DTYPES)}, got {getattr(self, key)!r}")
        if self.basis not in ("plain", "whitened"):
            raise UserError(f"basis must be plain or whitened, got {self.basis!r}")
        if self.whiten_samples < 0:
            raise UserError(f"whiten_samples must be ≥ 0 (0 = all chunks), got {self.whiten_samples}")
        if self.batch_size < 1 or self.lora_rank < 0 or self.mask_scale <= 0 or self.lr <= 0:
            raise UserError("batch_size ≥ 1, lora_rank ≥ 0, mask_scale > 0 and lr > 0 are required")
        if self.distributed not in ("auto", "none", "fsdp"):
            raise UserError(f"distributed must be auto, none or fsdp, got {self.distributed!r}")
        check_shrink(self.gram_shrink)
        check_distill(self.distill, self.distill_only)
        if self.holdout < 0 or (self.holdout >= 1 and self.holdout != int(self.holdout)):
            raise UserError(f"holdout must be a fraction in [0, 1) or a whole number of chunks, got {self.holdout}")
        if self.holdout_every < 1 or self.holdout_patience < 0:
            raise UserError("holdout_every ≥ 1 and holdout_patience ≥ 0 are required")
        if self.post_tune_size not in ("stop", "any"):
            raise UserError(f"post_tune_size must be stop or any, got {self.post_tune_size!r}")
        if self.post_tune_size == "any" and self.holdout:
            # Early stopping compares held-out NLL between evaluations; under a size drawn per step
            # those would be NLLs of different models.
            raise UserError("holdout (early stopping) needs post_tune_size=stop: with post_tune_size=any each "
                            "post-tuning step trains another size, so held-out NLLs would compare different models")


# Config fields that change the result: a checkpoint written under other values cannot be resumed.
_RESULT_KEYS = ("stop_ratio", "lr", "reg_start", "reg_update_every", "reg_update_factor", "mask_scale",
                "lora_rank", "lora_alpha", "lora_dropout", "post_tune_steps", "batch_size",
                "size_includes_lora", "svd_dtype", "factor_dtype", "basis", "whiten_samples", "seed",
                "gram_shrink", "distill", "distill_only", "holdout", "holdout_every", "holdout_patience",
                "post_tune_size")


# Result-relevant settings that checkpoints written before they existed ran with.
_LEGACY_DEFAULTS = {"basis": "plain", "gram_shrink": 0.0, "distill": 0.0, "distill_only": False, "holdout": 0.0,
                    "holdout_every": 50, "holdout_patience": 4, "post_tune_size": "stop"}


class ACIPPaused(Exception):
    """A callback asked to pause: the state is checkpointed; rerun with ``resume=True`` to go on."""


# ---------------------------------------------------------------------------- setup
@torch.no_grad()
def compute_svd_factors(
    model: nn.Module, names: list[str], *, svd_dtype: str = "float32", factor_dtype: str = "float32",
    progress: bool = False,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """{name: (U [m,k], s [k], Vh [k,n])} of each named linear's weight, on the CPU in `factor_dtype`.

    The SVD runs on the weight's device in `svd_dtype`; s is always kept in float32.
    """
    targets = target_linears(model)
    items = names
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(names, desc="SVD", unit="layer", leave=False)
    store = _DTYPES[factor_dtype]
    out = {}
    for name in items:
        weight = targets[name].weight.detach()
        u, s, vh = torch.linalg.svd(weight.to(_DTYPES[svd_dtype]), full_matrices=False)
        out[name] = (u.to(store).cpu(), s.float().cpu(), vh.to(store).cpu())
    return out


@torch.no_grad()
def compute_whitened_factors(
    model: nn.Module, names: list[str], chunks: Tensor, *, samples: int = 128, batch_size: int = 4,
    factor_dtype: str = "float32", progress: bool = False, shrink: float = 0.0,
) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], dict[str, Any]]:
    """Factors W = U·diag(s)·Vh in the whitened basis, on the CPU; returns (factors, whitening info).

    With G = S·Sᵀ the Gram of the layer's calibration inputs and W·S = U·Σ·Q̂ᵀ, the factors are
    U (orthonormal columns), s = Σ and Vh = Q̂ᵀ·S⁻¹ (rows not orthonormal); their product is W.
    Dropping the smallest s is then the best truncation in the norm of the layer's outputs on
    the calibration inputs, ‖(W − W')·Xᵀ‖ (SVD-LLM), so ACIP's masks score directions the data
    uses. Grams, damping and the whitened SVD are those of the `svd` method (float64 SVD).
    `samples` chunks, evenly spaced over `chunks`, feed the Gram (0: all of them). `shrink` whitens
    by (1 − shrink)·G + shrink·mean(diag G)·I (1: the plain basis, up to scaling of the rows).
    """
    from compress.calibrate import collect_input_grams
    from compress.whitening import whitened_svd_factors

    n = chunks.shape[0]
    if 0 < samples < n:
        chunks = chunks[torch.linspace(0, n - 1, samples).round().long()]
    targets = target_linears(model)
    grams = collect_input_grams(model, chunks, names, batch_size=batch_size, progress=progress)
    items = names
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(names, desc="whitened SVD", unit="layer", leave=False)
    store = _DTYPES[factor_dtype]
    out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    damped: dict[str, float] = {}
    for name in items:
        # Balanced factors u·√Σ and √Σ·Q̂ᵀS⁻¹ (float32), split back into U, s, Vh. A zero singular
        # value (rank-deficient W·S) leaves a zero triplet, which contributes nothing either way.
        u_bal, v_bal, s, damping = whitened_svd_factors(targets[name].weight, grams[name], name, shrink)
        root = s.clamp_min(0).sqrt()
        inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
        out[name] = ((u_bal * inv).to(store).cpu(), s.float().cpu(), (v_bal * inv[:, None]).to(store).cpu())
        if damping:
            damped[name] = damping
    tokens = grams.tokens
    del grams
    return out, {"samples": int(chunks.shape[0]), "tokens": int(tokens), "damped_layers": damped,
                 "gram_shrink": float(shrink)}


def install_masked_layers(
    model: nn.Module,
    factors: dict[str, tuple[Tensor, Tensor, Tensor]],
    config: ACIPConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    biases: dict[str, Tensor | None] | None = None,
) -> tuple[MaskBank, dict[str, MaskedSVDLinear]]:
    """Swap every factorized linear of `model` for a `MaskedSVDLinear`; returns the mask bank and layers.

    The caller keeps the replaced modules if it wants them back. LoRA A is drawn from the
    global RNG, so seed it first for reproducible runs.
    """
    names = list(factors)
    segments = Segments.from_shapes([(f[0].shape[0], f[2].shape[1]) for f in factors.values()])
    bank = MaskBank(segments, config.mask_scale, device=device)
    targets = target_linears(model) if biases is None else None
    layers = {}
    for i, name in enumerate(names):
        U, s, Vh = factors[name]
        bias = biases[name] if biases is not None else targets[name].bias
        u_dev = U.to(device=device, dtype=dtype)
        # diag(s)·Vh is formed in float32 and rounded once to the compute dtype.
        vs_dev = s.to(device, torch.float32)[:, None] * Vh.to(device, torch.float32)
        layer = MaskedSVDLinear(u_dev, vs_dev.to(dtype), bias, bank, i, lora_rank=config.lora_rank,
                                lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
        replace_module_(model, name, layer)
        layers[name] = layer
    return bank, layers


def _checkpoint_policy():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = {torch.ops.acip.masked_lowrank.default}
    # Attention outputs are cheap to keep (T × hidden) and save re-running the attention kernel.
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            save.add(op.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def enable_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every decoder block ("full"), or recompute only its element-wise ops ("selective")."""
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _checkpoint_policy()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode != "none":
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------- data
def split_holdout(chunks: Tensor, holdout: float) -> tuple[Tensor, Tensor | None]:
    """(training chunks, held-out chunks or None): `holdout` < 1 is a fraction, ≥ 1 a count of chunks.

    The held-out chunks are evenly spaced over `chunks` (a mixture's chunks come grouped by source, so
    every source is represented); at least one chunk always stays for training.
    """
    if not holdout:
        return chunks, None
    n = chunks.shape[0]
    count = int(holdout) if holdout >= 1 else max(1, round(holdout * n))
    count = min(count, n - 1)
    if count <= 0:
        warnings.warn(f"ACIP holdout={holdout}: {n} calibration chunk(s) leave none to hold out; early "
                      "stopping is off", stacklevel=2)
        return chunks, None
    # Every k-th chunk rather than the tail, so a mixture's sources are all represented.
    idx = torch.linspace(0, n - 1, count).round().long().unique()
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return chunks[keep], chunks[idx]


# A training step's next-token logits (B·L·V) live in float32 in a few copies at once (logits, the
# loss's softmax, the teacher's distribution, their gradient). A step runs its batch in micro-batches
# of at most this many logit elements (1 GiB per float32 copy), each with its own forward and backward,
# so the vocabulary does not decide the peak memory: Gemma 3 (V = 262,144) runs one 1024-token
# sequence at a time; SmolLM2 (V = 49,152) keeps its whole batch of 4 in one pass.
LOGIT_ELEMENTS_PER_PASS = 2**28


def rows_per_pass(rows: int, seq_len: int, vocab: int, budget: int | None = None) -> int:
    """How many of a batch's `rows` sequences one forward/backward pass takes (≥ 1, ≤ rows).

    `budget`: logit elements per pass (default `LOGIT_ELEMENTS_PER_PASS`, read at call time).
    """
    budget = LOGIT_ELEMENTS_PER_PASS if budget is None else budget
    return max(1, min(rows, budget // max(1, seq_len * vocab)))


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return head.out_features
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", 0) or 1)


@torch.no_grad()
def holdout_nll(model: nn.Module, bank: MaskBank, chunks: Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token NLL of `chunks` under the current masks and LoRA, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        bank.refresh()
        total, count = 0.0, 0
        for start in range(0, chunks.shape[0], batch_size):
            batch = chunks[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                              batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll.double())
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _chunks_hash(chunks: Tensor) -> str:
    return hashlib.sha256(chunks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


class _Batches:
    """Reproducible epochs over the calibration chunks; the position is two integers (epoch, cursor).

    With `world_size` > 1 every rank draws the same global batch and returns its contiguous
    slice `rank` of `world_size` (batch_size must be a multiple of world_size).
    """

    def __init__(self, chunks: Tensor, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.chunks = chunks
        self.batch_size = min(batch_size, chunks.shape[0])
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.cursor = 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.chunks.shape[0], generator=gen)

    def set_position(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = self._perm(epoch)

    def next(self) -> Tensor:
        # A short tail is skipped so every batch has the same shape.
        if self.cursor + self.batch_size > self._order.numel():
            self.set_position(self.epoch + 1, 0)
        idx = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        if self.world_size > 1:
            per = self.batch_size // self.world_size
            idx = idx[self.rank * per : (self.rank + 1) * per]
        return self.chunks[idx]


# ---------------------------------------------------------------------------- interrupt handling
class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag checked between steps, so the checkpoint is consistent.

    A second Ctrl-C interrupts at once. Only installed from the main thread.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True
                print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
                      flush=True)

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------- checkpoint I/O
def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_factors(directory: Path, factors: dict[str, tuple[Tensor, Tensor, Tensor]], meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_NAME).unlink(missing_ok=True)  # a stale state must never meet new factors
    (directory / META_NAME).unlink(missing_ok=True)
    tensors = {}
    for name, (U, s, Vh) in factors.items():
        tensors[f"{name}.U"], tensors[f"{name}.s"], tensors[f"{name}.Vh"] = U, s, Vh
    tmp = directory / (FACTORS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    apply_umask_permissions(tmp)  # safetensors writes 0o600
    os.replace(tmp, directory / FACTORS_NAME)
    tmp_meta = directory / (META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp_meta, directory / META_NAME)


def _read_factors(directory: Path, names: list[str]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    tensors = load_file(str(directory / FACTORS_NAME))
    return {n: (tensors[f"{n}.U"], tensors[f"{n}.s"], tensors[f"{n}.Vh"]) for n in names}


# ---------------------------------------------------------------------------- the run
@dataclass
class _State:
    step: int = 0  # optimizer steps done, both phases
    acip_steps: int = 0
    post_steps: int = 0
    phase: str = "acip"  # acip -> post_tune -> done
    ratio: float = 1.0
    lam: float = 0.0  # λ of the last step (recomputable from acip_steps; stored for inspection)
    stop_reached: bool = False
    scores: Tensor | None = None
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    # Early stopping of the post-tuning (config.holdout): best held-out NLL, its post-tuning step, its LoRA.
    best_holdout: float | None = None
    best_post_step: int = 0
    bad_evals: int = 0
    holdout_history: list = dataclasses.field(default_factory=list)
    best_lora: dict | None = None


def run_acip(
    model: nn.Module,
    chunks: Tensor,
    config: ACIPConfig,
    *,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
) -> ScoreMap:
    """Score `model` with ACIP on calibration `chunks` [n, seq_len]; returns the score map.

    The model is modified only while this runs: its original linears are back in place when
    it returns (or raises). `callback(info)` is called after every step; returning True ends
    the run early (the score map then covers only down to the size reached); returning
    ``"pause"`` writes a checkpoint (`checkpoint_dir` is required) and raises `ACIPPaused`.

    Distributed (``config.distributed``, see `compress.methods.acip.distributed`): every process calls
    this with the same model, chunks and config; the frozen model is sharded, each process
    trains on its slice of every batch, only rank 0 writes checkpoints, and every process gets
    the same score map back. The callback runs on rank 0 only.
    """
    config.validate()
    if chunks is None or chunks.dim() != 2 or chunks.shape[1] < 2:
        raise UserError("ACIP needs calibration chunks of shape [n, seq_len ≥ 2]")
    targets = {n: m for n, m in target_linears(model).items() if isinstance(m, nn.Linear)}
    if not targets:
        raise UserError("ACIP found no dense target linears (is the model already compressed?)")
    names = list(targets)
    param = next(iter(targets.values())).weight
    device, dtype = param.device, param.dtype
    identity = model_identity(model, names)
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    chunk_hash = _chunks_hash(chunks)
    chunks, held_out = split_holdout(chunks, config.holdout)  # held-out chunks: never trained on

    dist = None
    if resolve_mode(config.distributed) == "fsdp":
        if config.cuda_graphs:
            raise UserError("cuda_graphs cannot be used with distributed (FSDP) scoring: FSDP's collectives and "
                            "hooks run outside a captured graph; set cuda_graphs=false or distributed=none")
        if len({p.device for p in model.parameters()}) > 1:
            raise UserError("distributed ACIP needs the whole model on one device per process")
        dist = DistributedRun.setup(device)
        device = dist.device
        dist.check_batch(min(config.batch_size, chunks.shape[0]))
        has_state = bool(config.resume and ckpt is not None and (ckpt / STATE_NAME).is_file())
        settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
        dist.check_agreement(model=identity, chunks_hash=chunk_hash, settings=settings,
                             checkpoint_state_found=has_state)
    writer = dist is None or dist.is_writer
    progress = config.progress and writer

    resume_state = None
    # A run that died after its factors were written but before its first training checkpoint (out of
    # memory in the first steps, say) still resumes them: the SVDs and whitening are not done twice.
    resumable = config.resume and ckpt is not None and (ckpt / META_NAME).is_file()
    has_state = resumable and (ckpt / STATE_NAME).is_file()
    if resumable and (has_state or (ckpt / FACTORS_NAME).is_file()):
        meta = json.loads((ckpt / META_NAME).read_text())
        check_identity(meta["identity"], model)
        stored = meta.get("config", {})
        stored = {**_LEGACY_DEFAULTS, **stored}
        changed = [k for k in _RESULT_KEYS if k in stored and stored[k] != getattr(config, k)]
        if changed:
            raise UserError(f"cannot resume from {ckpt}: it was run with other settings "
                            f"({', '.join(changed)}); use the same settings or start afresh without --resume")
        if meta.get("chunks_hash") != chunk_hash:
            raise UserError(f"cannot resume from {ckpt}: the calibration data differ from the "
                            "interrupted run's")
        factors = _read_factors(ckpt, names)
        whitening = meta.get("whitening")
        if has_state:
            resume_state = torch.load(ckpt / STATE_NAME, weights_only=True, map_location="cpu")
            if resume_state.get("version") != STATE_VERSION:
                raise UserError(f"{ckpt / STATE_NAME} has an unknown format")
        elif writer:
            print(f"note: {ckpt} holds the factors but no training step yet; training starts from step 0")
    else:
        if config.resume and writer:
            print(f"note: no checkpoint to resume in {ckpt}; starting afresh")
        whitening = None
        if config.basis == "whitened":
            factors, whitening = compute_whitened_factors(
                model, names, chunks, samples=config.whiten_samples, batch_size=config.batch_size,
                factor_dtype=config.factor_dtype, progress=progress, shrink=config.gram_shrink)
        else:
            factors = compute_svd_factors(model, names, svd_dtype=config.svd_dtype,
                                          factor_dtype=config.factor_dtype, progress=progress)
        if dist is not None:
            dist.broadcast_factors(factors)
        if ckpt is not None and writer:
            _write_factors(ckpt, factors, {"identity": identity, "config": dataclasses.asdict(config),
                                           "chunks_hash": chunk_hash, "layers": names, "whitening": whitening})

    torch.manual_seed(config.seed)  # LoRA init and dropout draw from the global generators
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    originals = dict(targets)
    offload = device.type == "cuda"
    # Distributed: train a copy of the module tree (sharing the tensors) that FSDP may rewrite;
    # the caller's `model` is then never changed.
    net = model if dist is None else scoring_copy(model)
    try:
        biases = {n: (None if m.bias is None else m.bias.detach().clone()) for n, m in originals.items()}
        if offload:  # the dense weights are idle while scoring: park them in host memory
            for module in originals.values():
                module.to("cpu")
        bank, layers = install_masked_layers(net, factors, config, device=device, dtype=dtype,
                                             biases=biases)
        net.requires_grad_(False)
        bank.p.requires_grad_(True)
        bank.distill, bank.distill_only = float(config.distill), bool(config.distill_only)
        lora_params = []
        for layer in layers.values():
            if layer.lora_A is not None:
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
                lora_params += [layer.lora_A, layer.lora_B]
        sharding = None
        if dist is not None:
            sharding = shard_for_scoring(net, layers, lora_params, dist.mesh)
            if dist.rank > 0:  # LoRA init is every rank's; dropout draws are each rank's own
                torch.manual_seed(dist.rank_seed(config.seed, 0))
        graphs = config.cuda_graphs and (device.type == "cuda" or _EMULATE_GRAPHS)
        opt_kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": 0.0}
        if device.type == "cuda":
            opt_kwargs["fused"] = True
            opt_kwargs["capturable"] = graphs  # optimizer.step() inside a CUDA graph
        optimizer = torch.optim.AdamW([bank.p] + lora_params, **opt_kwargs)
        if dist is not None:
            dist.average_gradients(optimizer)
        batches = _Batches(chunks, config.batch_size, config.seed,
                           rank=dist.rank if dist else 0, world_size=dist.world_size if dist else 1)
        state = _State()
        if resume_state is not None:
            _restore(resume_state, state, bank, layers, optimizer, batches, device)
            if dist is not None:
                _restore_rank_rng(resume_state, dist, config.seed, state.step, device)
            if writer:
                print(f"resumed ACIP from {ckpt} at step {state.step} ({state.phase})")
        net.train()
        enable_activation_checkpointing(net, config.activation_checkpointing)
        stepper = _Stepper(net, bank, optimizer, device, graphs=graphs)
        try:
            singular = torch.cat([factors[name][1].float() for name in names])
            _train(net, bank, layers, stepper, optimizer, batches, state, config, ckpt, callback, device, dist,
                   held_out, singular)
        finally:
            stepper.release()
            disable_activation_checkpointing(net, config.activation_checkpointing)
        result = _score_map(factors, state, bank, layers, config, identity, names)
        result.metadata["whitening"] = whitening
        if held_out is not None:
            result.metadata["holdout"] = {
                "holdout_chunks": int(held_out.shape[0]), "best_holdout_nll": state.best_holdout,
                "best_post_step": state.best_post_step, "post_steps_run": state.post_steps,
                "history": state.holdout_history}
        result.metadata["step_mode"] = stepper.mode
        if stepper.note:
            result.metadata["step_mode_note"] = stepper.note
        if dist is not None:
            result.metadata["distributed"] = {**dist.describe(), **sharding}
    finally:
        for name, module in originals.items():
            if offload:
                module.to(device)
            replace_module_(model, name, module)
        model.train(was_training)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return result


def _restore_rank_rng(payload: dict, dist: DistributedRun, seed: int, step: int, device: torch.device) -> None:
    # `_restore` set rank 0's RNG state on every rank; ranks > 0 take their own when the
    # checkpoint has one (written by a run of this size), else a seed of their own.
    ranks = payload.get("rng_ranks")
    if ranks is not None and len(ranks) == dist.world_size:
        _restore_rng(ranks[dist.rank], device)
    elif dist.rank > 0:
        torch.manual_seed(dist.rank_seed(seed, step))


def _snapshot_rng(device: torch.device) -> dict[str, Any]:
    snap = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
    return snap


def _restore_rng(snap: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(snap["cpu"])
    if "cuda" in snap and device.type == "cuda":
        torch.cuda.set_rng_state(snap["cuda"], device)


def _save_state(ckpt: Path, state: _State, bank: MaskBank, layers: dict[str, MaskedSVDLinear],
                optimizer: torch.optim.Optimizer, position: tuple[int, int], rng: dict[str, Any],
                rng_ranks: list[dict[str, Any]] | None = None) -> None:
    payload = {
        "version": STATE_VERSION,
        "step": state.step, "acip_steps": state.acip_steps, "post_steps": state.post_steps,
        "phase": state.phase, "ratio": state.ratio, "stop_reached": state.stop_reached, "lambda": state.lam,
        "train_seconds": state.train_seconds,
        "history": json.dumps(state.history),
        "p": bank.p.detach().cpu(),
        "scores": None if state.scores is None else state.scores.cpu(),
        "lora_A": {n: m.lora_A.detach().cpu() for n, m in layers.items() if m.lora_A is not None},
        "lora_B": {n: m.lora_B.detach().cpu() for n, m in layers.items() if m.lora_B is not None},
        "optimizer": optimizer.state_dict(),
        "epoch": position[0], "cursor": position[1],
        "rng": rng,
        "early_stopping": {"best_holdout": state.best_holdout, "best_post_step": state.best_post_step,
                           "bad_evals": state.bad_evals, "history": json.dumps(state.holdout_history),
                           "best_lora": state.best_lora},
    }
    if rng_ranks is not None:  # a distributed run: every rank's RNG state, rank 0's is `rng`
        payload["rng_ranks"] = rng_ranks
    _atomic_torch_save(payload, ckpt / STATE_NAME)


def _restore(payload: dict, state: _State, bank: MaskBank, layers: dict[str, MaskedSVDLinear],
             optimizer: torch.optim.Optimizer, batches: _Batches, device: torch.device) -> None:
    with torch.no_grad():
        bank.p.copy_(payload["p"])
        for n, m in layers.items():
            if m.lora_A is not None:
                m.lora_A.copy_(payload["lora_A"][n])
                m.lora_B.copy_(payload["lora_B"][n])
    optimizer.load_state_dict(payload["optimizer"])
    for key in ("step", "acip_steps", "post_steps", "phase", "ratio", "stop_reached"):
        setattr(state, key, payload[key])
    state.train_seconds = payload.get("train_seconds", 0.0)
    state.lam = payload.get("lambda", 0.0)
    state.history = json.loads(payload.get("history", "[]"))
    early = payload.get("early_stopping") or {}
    state.best_holdout = early.get("best_holdout")
    state.best_post_step = early.get("best_post_step", 0)
    state.bad_evals = early.get("bad_evals", 0)
    state.holdout_history = json.loads(early.get("history", "[]"))
    best = early.get("best_lora")
    state.best_lora = None if best is None else {n: (a.to(device), b.to(device)) for n, (a, b) in best.items()}
    state.scores = None if payload["scores"] is None else payload["scores"].to(device)
    if state.phase != "acip":
        bank.p.requires_grad_(False)
    batches.set_position(payload["epoch"], payload["cursor"])
    _restore_rng(payload["rng"], device)


def training_step(model: nn.Module, bank: MaskBank, optimizer: torch.optim.Optimizer, batch: Tensor,
                  reg: float | None) -> Tensor:
    """One optimizer step on next-token NLL (+ reg·Σ relu(p) when `reg` is given); returns the NLL."""
    nll = _step_body(model, bank, optimizer, batch, reg)
    optimizer.zero_grad(set_to_none=True)
    return nll


def _step_body(model: nn.Module, bank: MaskBank, optimizer: torch.optim.Optimizer, batch: Tensor,
               reg: float | Tensor | None) -> Tensor:
    # Forward, backward, update; the gradients are left in place (a CUDA graph rewrites them).
    rows = batch.shape[0]
    step = rows_per_pass(rows, batch.shape[1], _vocab_size(model))
    nll_total: Tensor | None = None
    for start in range(0, rows, step):
        part = batch[start : start + step]
        share = part.shape[0] / rows  # passes of equal-length sequences: the batch mean is the weighted sum
        nll, loss = _pass_loss(model, bank, part)
        if share != 1.0:
            loss, nll = loss * share, nll * share
        if reg is not None and start + step >= rows:  # the L1 term once per step
            loss = loss + reg * l1_penalty(bank.p)
        loss.backward()
        nll_total = nll.detach() if nll_total is None else nll_total + nll.detach()
    optimizer.step()
    assert nll_total is not None
    return nll_total


def _pass_loss(model: nn.Module, bank: MaskBank, batch: Tensor) -> tuple[Tensor, Tensor]:
    """(next-token NLL, training loss) of one pass; the masks are recomputed, as autograd frees them."""
    bank.refresh()
    weight = bank.distill
    if not weight:
        nll = model(input_ids=batch, labels=batch, use_cache=False).loss
        return nll, nll
    # The teacher is the same network with every mask on and no LoRA: the dense model, no second copy.
    with torch.no_grad():
        bank.teacher = True
        try:
            teacher = model(input_ids=batch, use_cache=False).logits
        finally:
            bank.teacher = False
    out = model(input_ids=batch, labels=batch, use_cache=False)
    kl = distill_loss(out.logits, teacher)
    del teacher
    return out.loss, training_loss(out.loss, kl, weight, bank.distill_only)


# Tests set this to run the graph path's warm-up/undo logic on the CPU, without capturing.
_EMULATE_GRAPHS = False


class _Stepper:
    """Runs training steps eagerly, or as replays of a CUDA graph captured once per phase.

    On a small model the eager step is bound by Python and launch overhead (for SmolLM2-135M most
    of the step is host time; bench/results/acip_cost_*.json has the measurements). A capture needs
    a few eager warm-up steps first (lazy initialisation, cuBLAS workspaces); their effect on
    parameters, optimizer state and RNG state is undone before capturing, so the run takes the
    same steps as an eager one (up to which random numbers dropout draws). The batch and λ are
    copied into static tensors before each replay. If the capture fails, the run goes on eagerly
    and `note` says why.
    """

    def __init__(self, model: nn.Module, bank: MaskBank, optimizer: torch.optim.Optimizer,
                 device: torch.device, *, graphs: bool, warmup: int = 2) -> None:
        self.model, self.bank, self.optimizer, self.device = model, bank, optimizer, device
        self.mode = "cuda_graph" if graphs else "eager"
        self.emulate = graphs and device.type != "cuda"
        self.warmup = warmup
        self.note: str | None = None
        self._key: tuple | None = None
        self._graph = None
        self._static: tuple[Tensor, Tensor, Tensor | None] | None = None

    def __call__(self, batch: Tensor, reg: float | None) -> Tensor:
        if self.mode == "eager":
            return training_step(self.model, self.bank, self.optimizer, batch.to(self.device), reg)
        key = (reg is not None, tuple(batch.shape))
        if key != self._key:
            self.release()
            try:
                self._capture(batch, reg is not None)
            except Exception as exc:  # noqa: BLE001 - any capture failure: fall back, say why
                self.release()
                self.optimizer.zero_grad(set_to_none=True)
                self.mode = "eager"
                self.note = f"CUDA graph capture failed, ran eagerly: {type(exc).__name__}: {exc}"[:500]
                warnings.warn(self.note, stacklevel=2)
                return self(batch, reg)
            self._key = key
        static_batch, static_reg, static_nll = self._static
        static_batch.copy_(batch)
        if self.emulate:  # the same step, through the static batch, eagerly
            return training_step(self.model, self.bank, self.optimizer, static_batch, reg)
        if reg is not None:
            static_reg.fill_(reg)
        self._graph.replay()
        return static_nll

    def release(self) -> None:
        self._graph = self._static = self._key = None

    def _capture(self, batch: Tensor, with_reg: bool) -> None:
        model, bank, opt, device = self.model, self.bank, self.optimizer, self.device
        params = [p for group in opt.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {i: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                       for i, p in enumerate(params) if opt.state.get(p)}
        rng = _snapshot_rng(device)
        static_batch = batch.to(device).clone()
        static_reg = torch.zeros((), dtype=torch.float32, device=device)
        reg = static_reg if with_reg else None
        if self.emulate:
            for _ in range(self.warmup):
                training_step(model, bank, opt, static_batch, reg)
        else:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    training_step(model, bank, opt, static_batch, reg)
            torch.cuda.current_stream(device).wait_stream(side)
        # Undo the warm-up: parameters, optimizer state (fresh state is all zeros), RNG.
        with torch.no_grad():
            for p, saved in zip(params, saved_params, strict=True):
                p.copy_(saved)
            for i, p in enumerate(params):
                old = saved_state.get(i)
                for k, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        v.copy_(old[k]) if old is not None else v.zero_()
        _restore_rng(rng, device)
        opt.zero_grad(set_to_none=True)
        if self.emulate:
            self._static = (static_batch, static_reg, None)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_nll = _step_body(model, bank, opt, static_batch, reg)
        self._graph = graph
        self._static = (static_batch, static_reg, static_nll)


def _train(model: nn.Module, bank: MaskBank, layers: dict[str, MaskedSVDLinear], stepper: _Stepper,
           optimizer: torch.optim.Optimizer, batches: _Batches, state: _State, config: ACIPConfig,
           ckpt: Path | None,
           callback: Callable[[dict[str, Any]], bool | None] | None, device: torch.device,
           dist: DistributedRun | None = None, held_out: Tensor | None = None,
           singular: Tensor | None = None) -> None:
    segments = bank.segments
    any_size: tuple[Tensor, Tensor] | None = None  # post_tune_size="any": (entry positions, kept counts)

    @torch.no_grad()
    def draw_post_tune_mask() -> None:
        # One of the score map's sizes for this post-tuning step, drawn from (seed, step) alone so that a
        # resumed run draws the same sequence; written into p in place, which a captured CUDA graph reads.
        nonlocal any_size
        if any_size is None:
            if singular is None:
                raise ValueError("post_tune_size='any' needs the singular values")
            rank_of_entry, counts, _ = post_tune_masks(state.scores, singular, segments, state.ratio,
                                                       extra_rank=config.lora_rank)
            any_size = (rank_of_entry.to(bank.p.device), counts)
        rank_of_entry, counts = any_size
        pick = torch.Generator().manual_seed(config.seed * 1_000_003 + state.post_steps)
        keep = int(counts[int(torch.randint(counts.numel(), (1,), generator=pick))])
        bank.p.copy_(torch.where(rank_of_entry < keep, bank.scale, -bank.scale))

    @torch.no_grad()
    def restore_stop_mask() -> None:
        # Back to the masks pruning ended with (alive entries score their p), as post_tune_size="stop" leaves them.
        scores = state.scores.to(bank.p.device)
        bank.p.copy_(torch.where(scores > 0, scores, -bank.scale))

    def check_holdout() -> None:
        # Early stopping: held-out NLL of the current LoRA; keep the best, count evaluations without a gain.
        nll = holdout_nll(model, bank, held_out, config.batch_size, device)
        state.holdout_history.append({"post_step": state.post_steps, "nll": round(nll, 6)})
        if state.best_holdout is None or nll < state.best_holdout:
            state.best_holdout, state.best_post_step, state.bad_evals = nll, state.post_steps, 0
            state.best_lora = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                               for n, m in layers.items() if m.lora_A is not None}
        else:
            state.bad_evals += 1
        if config.holdout_patience and state.bad_evals >= config.holdout_patience:
            state.phase = "done"

    def restore_best() -> None:
        if state.best_lora is None:
            return
        with torch.no_grad():
            for n, (a, b) in state.best_lora.items():
                layers[n].lora_A.copy_(a)
                layers[n].lora_B.copy_(b)
    extra = config.lora_rank if config.size_includes_lora else 0
    num_layers = len(segments.lengths)
    writer = dist is None or dist.is_writer

    def save(position: tuple[int, int], rng: dict[str, Any], *, collective: bool = True) -> None:
        # Distributed: all ranks reach here at the same step; rank 0 writes. `collective=False`
        # (an abort not agreed between ranks) writes without gathering the other ranks' RNG.
        rng_ranks = dist.gather_rng(rng) if dist is not None and collective else None
        if writer:
            _save_state(ckpt, state, bank, layers, optimizer, position, rng, rng_ranks)

    agreed_stop = False
    bar = None
    if config.progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(desc="ACIP", unit="step", initial=state.step, dynamic_ncols=True)
    # The position and RNG state at the start of the current step: what a checkpoint taken when
    # the step is cut short must hold.
    position = (batches.epoch, batches.cursor)
    rng = _snapshot_rng(device)
    t_start = time.perf_counter() - state.train_seconds
    try:
        with _DeferredInterrupt() as interrupt:
            while state.phase != "done":
                position = (batches.epoch, batches.cursor)
                rng = _snapshot_rng(device)
                batch = batches.next()
                if state.phase == "post_tune" and config.post_tune_size == "any":
                    draw_post_tune_mask()
                lam = reg_weight(state.acip_steps, config.reg_start, config.reg_update_every,
                                 config.reg_update_factor)
                nll = stepper(batch, lam if state.phase == "acip" else None)
                state.lam = lam
                state.step += 1
                if state.phase == "acip":
                    state.scores = update_scores(state.scores, bank.p)
                    state.acip_steps += 1
                    counts = alive_counts(bank.p.detach(), bank.layer_index, num_layers).cpu()
                    state.ratio = size_for_counts(counts, segments, extra_rank=extra)
                    if state.ratio <= config.stop_ratio or state.acip_steps >= config.max_steps:
                        state.stop_reached = state.ratio <= config.stop_ratio
                        if not state.stop_reached:
                            warnings.warn(f"ACIP hit max_steps={config.max_steps} at size {state.ratio:.3f} "
                                          f"before the stop ratio {config.stop_ratio}; the score map covers "
                                          f"sizes ≥ {state.ratio:.3f}", stacklevel=2)
                        state.phase = "post_tune" if config.post_tune_steps > 0 else "done"
                        bank.p.requires_grad_(False)
                        if held_out is not None and state.phase == "post_tune":
                            check_holdout()  # the LoRA as pruning left it is a candidate too
                else:
                    state.post_steps += 1
                    if state.post_steps >= config.post_tune_steps:
                        state.phase = "done"
                    if held_out is not None and (state.post_steps % config.holdout_every == 0
                                                 or state.phase == "done"):
                        check_holdout()
                    if held_out is not None and state.phase == "done":
                        restore_best()
                if dist is None:
                    loss_value, stop_now = float(nll.detach()), False
                else:  # the loss over the whole batch, and a Ctrl-C seen by any rank so far, on every rank
                    loss_value, stop_now = dist.consensus(nll, interrupt.requested)
                state.train_seconds = time.perf_counter() - t_start
                info = {"step": state.step, "phase": state.phase, "size": state.ratio, "lambda": lam,
                        "loss": loss_value, "seconds": state.train_seconds}
                if state.step % 10 == 0 or state.phase == "done":
                    rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in info.items()}
                    state.history.append(rounded)
                if bar is not None:
                    bar.update(1)
                    postfix = f"{state.phase} size={state.ratio:.3f} λ={lam:.2e} loss={loss_value:.3f}"
                    bar.set_postfix_str(postfix,
                                        refresh=False)
                answer = callback(info) if callback is not None and writer else None
                if dist is not None:
                    answer = dist.share_answer(answer)
                pause = isinstance(answer, str) and answer == "pause" and state.phase != "done"
                if pause and ckpt is None:
                    raise UserError("the ACIP callback asked to pause, but there is no checkpoint_dir to resume from")
                if answer and not pause and state.phase != "done":
                    state.phase = "done"
                position = (batches.epoch, batches.cursor)
                rng = _snapshot_rng(device)
                fault_point("acip:step")  # fault suite (tests/compress/test_faults.py); inert otherwise
                if ckpt is not None and (pause or state.step % config.checkpoint_every == 0
                                         or state.phase == "done"):
                    save(position, rng)
                if pause:
                    raise ACIPPaused(f"ACIP paused at step {state.step} ({state.phase}); resume from {ckpt}")
                # One process: a Ctrl-C up to the end of this step stops here. Distributed: only the
                # agreed flag may (a later Ctrl-C is agreed on at the next step).
                if stop_now or (dist is None and interrupt.requested):
                    agreed_stop = True
                    raise KeyboardInterrupt
            if config.post_tune_size == "any" and state.post_steps > 0:
                restore_stop_mask()
    except KeyboardInterrupt:
        # Steps apply atomically (optimizer.step either ran or not), so the state as of the last
        # completed step is consistent; `position`/`rng` were taken right after it.
        if ckpt is not None:
            save(position, rng, collective=agreed_stop)
        if ckpt is not None and writer:
            print(f"\nACIP interrupted at step {state.step}; resumable checkpoint in {ckpt} "
                  "(rerun with --resume)",
                  flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()


def _score_map(factors: dict[str, tuple[Tensor, Tensor, Tensor]], state: _State, bank: MaskBank,
               layers: dict[str, MaskedSVDLinear], config: ACIPConfig, identity: dict,
               names: list[str]) -> ScoreMap:
    scores = state.scores if state.scores is not None else bank.p.detach().float()
    per_layer = bank.segments.split(scores.cpu())
    out = {}
    for i, name in enumerate(names):
        U, s, Vh = factors[name]
        layer = layers[name]
        lora_a = None if layer.lora_A is None else layer.lora_A.detach().cpu().clone()
        lora_b = None if layer.lora_B is None else layer.lora_B.detach().cpu().clone()
        out[name] = ScoreMapLayer(U, s, Vh, per_layer[i].clone(), lora_a, lora_b)
    scaling = config.lora_alpha / config.lora_rank if config.lora_rank > 0 else 0.0
    seconds = max(state.train_seconds, 1e-9)
    meta = {
        "config": dataclasses.asdict(config),
        "basis": config.basis,
        "stop_ratio": config.stop_ratio,
        "stop_reached": state.stop_reached,
        "final_ratio": round(state.ratio, 6),
        "steps": state.step,
        "acip_steps": state.acip_steps,
        "post_tune_steps": state.post_steps,
        "final_lambda": reg_weight(state.acip_steps, config.reg_start, config.reg_update_every,
                                   config.reg_update_factor),
        "train_seconds": round(state.train_seconds, 3),
        "steps_per_second": round(state.step / seconds, 4),
        "history": state.history,
    }
    return ScoreMap("acip", out, identity, scaling, "scores", meta)
