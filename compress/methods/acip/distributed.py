"""ACIP scoring over several processes: the frozen model sharded with FSDP2, masks and LoRA replicated.

`run_acip` calls into this module when ``ACIPConfig.distributed`` resolves to ``"fsdp"``
(``"auto"`` does so whenever the process was started by ``torchrun`` / ``accelerate launch``
with WORLD_SIZE > 1, or a process group of more than one rank is already initialised).

What is sharded, and how
    The masked layers are installed into a *scoring copy* of the model: a new module tree
    that shares the caller's parameter and buffer tensors (so it costs no weight memory) but
    not its modules, so `fully_shard`'s in-place changes (class swap, hooks, DTensor
    parameters) never reach the caller's model, which comes back unchanged as in a
    single-process run. In that copy the frozen U, V_s (= diag(s)·Vᵀ, s is folded in) and
    bias of every `MaskedSVDLinear` become frozen parameters (FSDP2 shards parameters only;
    buffers stay replicated), then every decoder block and finally the root are
    `fully_shard`-ed on a 1-D mesh: each rank keeps 1/N of the rows of every frozen tensor,
    blocks are all-gathered one at a time for forward and backward.

    The trainable tensors (the flat mask vector, outside the module tree, and the LoRA
    branches, passed to FSDP as ``ignored_params``) stay plain, replicated tensors: they are
    ~1 % of a 7B model's factors, and keeping them plain keeps the fused AdamW (it refuses a
    mix of DTensor and plain tensors), the checkpoint format and resume exactly those of a
    single-process run (a checkpoint resumes under any number of processes). Their gradients
    are averaged by one flat all-reduce per step, run as an optimizer step pre-hook.

Why torch's `fully_shard` directly and not `accelerate.Accelerator(fsdp_plugin=...)`
    `Accelerator.prepare` with FSDP2 maps every optimizer parameter to a model parameter and
    raises for the mask vector (it lives outside the module tree, shared by all layers); it
    wraps the caller's model in place (the caller gets its model back here); and on CPU it
    selects MULTI_CPU (DDP) instead of FSDP, so the gloo path could not be tested. The
    process group is initialised from the launcher's environment (env://), which is what
    both ``torchrun`` and ``accelerate launch`` provide; backend nccl for CUDA, gloo for CPU.

Data order
    Every rank draws the same global batch from the same seeded permutation and keeps its
    contiguous 1/N slice (`ShardedBatches`); with equal slices the mean of the per-rank
    gradients is the single-process gradient, so the run follows the single-process run up
    to reduction-order rounding. LoRA dropout is the exception: each rank draws masks for
    its own slice (ranks > 0 from their own seed), so with ``lora_dropout > 0`` runs agree
    in distribution, not bit for bit.

Agreement
    The loss is averaged over ranks for logging; the callback runs on rank 0 and its answer
    is broadcast; a Ctrl-C on any rank stops all of them at the same step boundary; only
    rank 0 writes checkpoints (with every rank's RNG state, for exact resume).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from compress.errors import UserError

__all__ = ["MODES", "DistributedRun", "resolve_mode", "scoring_copy", "shard_for_scoring"]

MODES = ("auto", "none", "fsdp")


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise UserError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from exc


def resolve_mode(requested: str) -> str:
    """``"none"`` or ``"fsdp"`` for the ACIPConfig value `requested` (auto | none | fsdp) in this process."""
    if requested not in MODES:
        raise UserError(f"distributed must be one of {', '.join(MODES)}, got {requested!r}")
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else _env_world_size()
    if requested == "auto":
        return "fsdp" if world > 1 else "none"
    if requested == "none":
        if world > 1:
            raise UserError(f"distributed=none, but this process is one of {world} (WORLD_SIZE or an initialised "
                            "process group): each would run the whole scoring and write the same checkpoint; "
                            "use distributed=fsdp (or auto), or start one process")
        return "none"
    if not initialised and "RANK" not in os.environ:
        raise UserError("distributed=fsdp needs a launcher (torchrun / accelerate launch) or an initialised "
                        "torch.distributed process group")
    if not dist.is_available():
        raise UserError("distributed=fsdp: this torch build has no torch.distributed")
    return "fsdp"


# ---------------------------------------------------------------------------- the model copy and sharding
def scoring_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares every parameter and buffer tensor with it.

    `fully_shard` swaps module classes, installs hooks and replaces parameters by DTensors in
    place; doing that to a copy leaves the caller's model untouched. The tensors themselves
    are only read by FSDP (it copies each rank's shard into new storage), so sharing them
    costs no memory.
    """
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _frozen_to_parameters(layers: dict[str, nn.Module]) -> None:
    # FSDP2 shards parameters, never buffers: turn the masked layers' frozen buffers (U, V_s,
    # bias) into parameters that do not require gradients. The forward reads them by the
    # same attribute names, so the layer code is unchanged.
    for layer in layers.values():
        for key in ("U", "Vs", "bias"):
            tensor = layer._buffers.get(key)
            if tensor is None:
                continue
            del layer._buffers[key]
            layer.register_parameter(key, nn.Parameter(tensor, requires_grad=False))


def shard_for_scoring(scoring: nn.Module, layers: dict[str, nn.Module], trainable: list[Tensor],
                      mesh: Any) -> dict[str, Any]:
    """FSDP2 over `scoring` (its masked `layers` installed): every decoder block, then the root.

    `trainable` (the LoRA parameters) are left to the caller as plain replicated tensors.
    Returns a summary: how many frozen parameters are sharded and this rank's share of them.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lowrank.surgery import decoder_layers

    _frozen_to_parameters(layers)
    ignored = set(trainable)
    _, blocks = decoder_layers(scoring)
    for block in blocks:
        # Default reshard_after_forward: blocks free their gathered parameters after forward and
        # gather again in backward (the memory saving FSDP exists for).
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(scoring, mesh=mesh, ignored_params=ignored)
    full = local = count = 0
    for p in scoring.parameters():
        if isinstance(p, DTensor):
            count += 1
            full += p.numel()
            local += p.to_local().numel()
    return {"sharded_params": count, "sharded_numel": full,
            "local_fraction": round(local / full, 6) if full else 0.0}


# ---------------------------------------------------------------------------- the per-run context
@dataclasses.dataclass
class DistributedRun:
    """This process's place in a distributed scoring run, and the collectives the loop needs."""

    rank: int
    world_size: int
    device: torch.device  # where this rank computes (and where nccl collectives' tensors live)
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_writer(self) -> bool:
        """Only rank 0 prints progress and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def setup(cls, device: torch.device) -> DistributedRun:
        """Join (or initialise, from the launcher's environment) the default process group and build a 1-D mesh."""
        from torch.distributed.device_mesh import init_device_mesh

        if device.type not in ("cpu", "cuda"):
            raise UserError(f"distributed ACIP runs on CPU (gloo) or CUDA (nccl) devices, not {device}")
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise UserError(f"distributed ACIP: the launcher's environment lacks {', '.join(missing)} "
                                "(start with torchrun or accelerate launch)")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            # Destroyed at exit, not at the end of the run: the CLI's rank 0 still works after
            # scoring, and a script may score twice in one process.
            global _EXIT_GROUP
            # Destruction is collective: a follower that tears its group down while rank 0 is still
            # saving can abort (seen with gloo on a loaded 2-core CI machine). Every rank therefore
            # meets at exit on a side group whose timeout outlasts rank 0's evaluation and save.
            _EXIT_GROUP = dist.new_group(backend="gloo", timeout=_EXIT_WAIT)
            atexit.register(_destroy_group)
        backend = str(dist.get_backend())
        if device.type == "cpu" and "gloo" not in backend:
            raise UserError(f"the model is on the CPU but the process group's backend is {backend}; "
                            "CPU scoring needs gloo")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return cls(dist.get_rank(), dist.get_world_size(), device, backend, mesh)

    # -- start-up checks ---------------------------------------------------------------
    def check_agreement(self, **facts: Any) -> None:
        """Raise on every rank (no rank left waiting) when the ranks' `facts` differ."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, facts)
        for key in facts:
            values = [g[key] for g in gathered]
            if any(v != values[0] for v in values):
                raise UserError(f"distributed ACIP: the ranks disagree on {key} ({values}); every rank needs the "
                                "same model, calibration data and settings, and must see the same checkpoint_dir")

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise UserError(f"distributed ACIP splits each batch across the {self.world_size} processes: batch_size "
                            f"({batch_size}, after capping at the number of calibration chunks) must be a multiple "
                            f"of {self.world_size}")

    def broadcast_factors(self, factors: dict[str, tuple[Tensor, Tensor, Tensor]]) -> None:
        """Make every rank's SVD factors rank 0's, bit for bit (GPU SVDs need not be reproducible across devices)."""
        if self.world_size == 1:
            return
        for name in factors:
            out = []
            for t in factors[name]:
                buf = t.to(self.device).contiguous()
                dist.broadcast(buf, src=0)
                out.append(buf.to(t.device))
            factors[name] = (out[0], out[1], out[2])

    # -- training ----------------------------------------------------------------------
    def average_gradients(self, optimizer: torch.optim.Optimizer) -> Any:
        """Average the (replicated) trainable tensors' gradients over ranks before every optimizer step."""
        world = self.world_size

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for g in grads:
                by_dtype.setdefault(g.dtype, []).append(g)
            for same in by_dtype.values():
                # One collective per dtype: many small all-reduces would be latency-bound.
                flat = torch.cat([g.reshape(-1) for g in same])
                dist.all_reduce(flat)  # SUM: gloo has no AVG
                flat.div_(world)
                for g, part in zip(same, torch.split(flat, [g.numel() for g in same]), strict=True):
                    g.copy_(part.view_as(g))

        return optimizer.register_step_pre_hook(hook)

    def consensus(self, nll: Tensor, interrupt: bool) -> tuple[float, bool]:
        """(mean loss over ranks, whether any rank saw Ctrl-C) in one small all-reduce."""
        values = torch.stack([nll.detach().to(torch.float64).reshape(()),
                              torch.tensor(1.0 if interrupt else 0.0, dtype=torch.float64, device=nll.device)])
        values = values.to(self.device)
        dist.all_reduce(values)
        return float(values[0]) / self.world_size, bool(values[1] > 0)

    def share_answer(self, answer: Any) -> Any:
        """Rank 0's callback answer on every rank: None, True (stop) or "pause"."""
        code = 2 if isinstance(answer, str) and answer == "pause" else (1 if answer else 0)
        flag = torch.tensor([code if self.is_writer else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(flag, src=0)
        return {0: None, 1: True, 2: "pause"}[int(flag)]

    def gather_rng(self, rng: dict[str, Any]) -> list[dict[str, Any]]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, rng)
        return gathered

    def rank_seed(self, seed: int, step: int) -> int:
        # Dropout seed of ranks > 0 (rank 0 keeps the single-process stream); `step` separates a
        # resumed run from a fresh one when the checkpoint holds no RNG state for this rank.
        digest = hashlib.sha256(json.dumps([seed, self.rank, step]).encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        return {"mode": "fsdp", "world_size": self.world_size, "backend": self.backend,
                "device_type": self.device.type}


_EXIT_WAIT = datetime.timedelta(hours=24)
_EXIT_GROUP: Any = None


def _destroy_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if _EXIT_GROUP is not None:
        try:
            dist.barrier(group=_EXIT_GROUP)
        except Exception:  # noqa: BLE001 - a peer died: the launcher reaps the job; still tear down
            pass
    dist.destroy_process_group()
