"""Stream a model through one accelerator, one decoder block at a time, with its weights in CPU memory.

`offloaded(model, device)` attaches an accelerate hook (`accelerate.hooks.add_hook_to_module`)
to every decoder block and to each module outside the blocks that owns tensors (embeddings,
final norm, rotary embedding, lm_head). Around a hooked module's forward, the hook swaps
execution-device copies of the module's parameters and buffers into it and puts the CPU
originals back afterwards, so at most one block's weights sit on the accelerator at a time:
peak accelerator memory is one block plus activations, whatever the model's depth.

Why not accelerate's own offload hooks (`cpu_offload`, `dispatch_model` with "cpu" in the
device_map, `AlignDevicesHook(offload=True)`)? They park the weights on the "meta" device
between uses and serve them from a `weights_map` snapshot taken when the hook is attached.
Our methods read weights between forwards (the SVD of W), and replace or narrow modules in the
middle of a pass (svd-llm's update, minify, surgeon): they would see meta tensors, and the
snapshot would hand stale or wrongly shaped weights to the replaced modules. The hook here
keeps the parameters real, in CPU memory, between uses, and reads the block's *current*
modules each time it loads it, so replaced modules stream like the original ones. Inputs go
to the execution device with accelerate's `send_to_device`; the outermost module returns its
outputs on the device its inputs came from (accelerate's `io_same_device`), so a caller that
feeds CPU token ids (e.g. `compress.eval.perplexity_of_ids`) gets CPU logits back.

Backward passes (minify's Taylor scores, surgeon's K-FAC and LoRA steps): autograd keeps the
tensors an op saves for backward alive until the backward reaches it, and a linear saves its
weight. Without care every block's execution-device weights would stay alive through the
whole forward, i.e. the whole model on the accelerator. So under grad mode each block runs
inside `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: the forward saves only
the block's inputs, and the backward re-runs the block's forward, which re-triggers the hook
(the weights come over again) right before that block's backward, and frees them after it.
That costs one extra forward and one extra transfer of the weights per block and batch.
Forward hooks that *record* things (Gram accumulators, gradient hooks) must not record twice:
they check `recomputing()`, true while a block's forward is being re-run for its backward.
Hooks that change the computation (a LoRA adapter) must run both times, and do.

Rules for code running under `offloaded`:

- use `execution_device(model)`, not `next(model.parameters()).device` (that is the CPU);
- outside a forward, `module.weight` is the CPU tensor: per-layer math moves that layer's
  weight to the execution device, computes, and writes results back to CPU-resident modules;
- `held(block)` keeps a block's weights on the execution device across several calls (a
  block-sequential pass runs every calibration batch through one block); inside it
  `module.weight` is the execution-device copy. In-place edits of a held copy are written
  back to the CPU original when the hold ends; modules created during the hold on the
  execution device (svd-llm's factors, minify's narrowed MLPs) move to the CPU then;
- parameters are read-only in streamed forwards: a forward under grad mode refuses parameters
  that require grad (their gradient would land on a discarded copy). Freeze them first, as
  `compress.calibrate.activation_gradients` does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import find_device, send_to_device
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from compress.errors import UserError
from lowrank.surgery import decoder_layers

__all__ = [
    "OFFLOAD_DEVICE",
    "StreamHook",
    "default_execution_device",
    "execution_device",
    "held",
    "is_offloaded",
    "maybe_offloaded",
    "offloaded",
    "recomputing",
    "stream_hooks",
]

OFFLOAD_DEVICE = torch.device("cpu")

# Depth of block forwards being re-run for a backward. A plain counter, not thread-local:
# CUDA backward passes run on autograd's device threads, not on the thread that called
# .backward(), while that thread waits, so the forward and its recomputation never overlap.
_recompute_depth = 0


def recomputing() -> bool:
    """True while a checkpointed block re-runs its forward for the backward pass.

    Hooks that accumulate statistics return early then: the first forward already recorded
    them, and tensor hooks registered now never fire (the re-run's graph is not backpropagated).
    """
    return _recompute_depth > 0


@contextlib.contextmanager
def _recompute_scope() -> Iterator[None]:
    global _recompute_depth
    _recompute_depth += 1
    try:
        yield
    finally:
        _recompute_depth -= 1


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # torch.utils.checkpoint's context_fn: (context of the first forward, context of the re-run).
    return contextlib.nullcontext(), _recompute_scope()


def default_execution_device() -> torch.device:
    """The current CUDA device where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class _Slot:
    """One tensor swapped into a module: where it goes, the CPU original and the copy put there."""

    module: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    original: Tensor
    copy: Tensor
    version: int | None  # None for an inference tensor (no version counter; read-only use)


class StreamHook(ModelHook):
    """accelerate `ModelHook` that streams one unit (a decoder block, or a module's own tensors).

    `pre_forward` swaps execution-device copies of the unit's parameters and buffers in and
    sends the inputs to the execution device; `post_forward` puts the CPU originals back.
    Nested uses (a forward inside `held`) load once. `loads` counts the transfers of the unit
    to the execution device, `calls` the forwards, `bytes_loaded` the bytes actually copied
    (0 where the execution device is the CPU); tests and bench/quality/streaming_memory.py read them.
    """

    def __init__(self, execution_device: torch.device, *, recurse: bool, io_same_device: bool = False) -> None:
        self.execution_device = torch.device(execution_device)
        self.recurse = recurse
        self.io_same_device = io_same_device
        self.depth = 0
        self.loads = 0
        self.calls = 0
        self.bytes_loaded = 0
        self._slots: list[_Slot] = []
        self._installed: dict[int, Tensor] = {}  # id(copy in place) -> its original (copies live in _slots)
        self._input_devices: list[torch.device | None] = []

    # ------------------------------------------------------------------ accelerate's interface
    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.calls += 1
        if torch.is_grad_enabled():
            self._check_frozen(module)
        if self.io_same_device:
            self._input_devices.append(find_device([args, kwargs]))
        self.acquire(module)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.release(module)
        if self.io_same_device:
            device = self._input_devices.pop() if self._input_devices else None
            if device is not None and device != self.execution_device:
                output = send_to_device(output, device)
        return output

    # ------------------------------------------------------------------ loading
    def _tensors(self, unit: nn.Module) -> Iterator[tuple[nn.Module, str, str, Tensor]]:
        modules = unit.modules() if self.recurse else [unit]
        for module in modules:
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is not None:
                        yield module, kind, name, tensor

    def _check_frozen(self, unit: nn.Module) -> None:
        for module, kind, name, tensor in self._tensors(unit):
            original = self._installed.get(id(tensor), tensor)
            if kind == "_parameters" and original.requires_grad:
                raise RuntimeError(
                    f"offloaded forward with gradients: parameter {name!r} of {type(module).__name__} "
                    "requires grad, but streamed weights are copies whose gradients would be lost; "
                    "freeze the parameters (requires_grad_(False)) or run under torch.no_grad()")

    def acquire(self, unit: nn.Module) -> None:
        """Put the unit's weights on the execution device (once; nested calls only add new modules)."""
        if self.depth == 0:
            self.loads += 1
        # A rescan at every entry: modules that replaced others since the last load (svd-llm,
        # minify and surgeon swap modules in mid-pass) stream too.
        copies: dict[int, Tensor] = {}
        for module, kind, name, tensor in list(self._tensors(unit)):
            if id(tensor) in self._installed:
                continue
            copy = copies.get(id(tensor))
            if copy is None:
                moved = tensor.detach().to(self.execution_device)
                if moved.data_ptr() != tensor.data_ptr():
                    self.bytes_loaded += tensor.numel() * tensor.element_size()
                # A new tensor object even where no copy was needed (execution device = CPU), so
                # "which weights are in use" is visible and every slot is restored the same way.
                copy = nn.Parameter(moved, requires_grad=False) if kind == "_parameters" else moved.view_as(moved)
                copies[id(tensor)] = copy
            getattr(module, kind)[name] = copy
            self._installed[id(copy)] = tensor
            version = None if copy.is_inference() else copy._version
            self._slots.append(_Slot(module, kind, name, tensor, copy, version))
        self.depth += 1

    def release(self, unit: nn.Module) -> None:
        """Undo one `acquire`; the last one puts the CPU originals back."""
        if self.depth <= 0:
            raise RuntimeError("StreamHook.release without a matching acquire")
        self.depth -= 1
        if self.depth == 0:
            self._unload(unit)

    def unwind(self, unit: nn.Module, depth: int, pending_inputs: int | None = None) -> None:
        """After an exception inside a forward: release down to `depth` (the depth before the call)."""
        while self.depth > depth:
            self.release(unit)
        if pending_inputs is not None:
            del self._input_devices[pending_inputs:]

    @torch.no_grad()
    def _unload(self, unit: nn.Module) -> None:
        for slot in reversed(self._slots):
            table = getattr(slot.module, slot.kind)
            if table.get(slot.name) is not slot.copy:
                continue  # the method put another tensor there meanwhile: keep it (moved below)
            edited = slot.version is not None and slot.copy._version != slot.version
            if edited and slot.copy.data_ptr() != slot.original.data_ptr():
                slot.original.copy_(slot.copy)  # an in-place edit of the held copy: keep it
            table[slot.name] = slot.original
        self._slots.clear()
        self._installed.clear()
        if self.execution_device != OFFLOAD_DEVICE:
            # Modules created during a hold on the execution device join the CPU-resident weights.
            for module, kind, name, tensor in list(self._tensors(unit)):
                if tensor.device != OFFLOAD_DEVICE:
                    moved = tensor.detach().to(OFFLOAD_DEVICE)
                    if kind == "_parameters":
                        moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                    getattr(module, kind)[name] = moved


def _is_block_call_checkpointable(kwargs: dict) -> bool:
    # A KV cache is updated inside the block: re-running the block for the backward would
    # append the same keys twice. Blocks called with a cache run without checkpointing
    # (correct, but their weights then stay alive until the backward).
    # (transformers ≥ 5.24 passes it as `cache`; older releases as `past_key_values` / `past_key_value`.)
    return all(kwargs.get(key) is None for key in ("cache", "past_key_values", "past_key_value"))


def _install_forward(module: nn.Module, hook: StreamHook, *, checkpointed: bool) -> None:
    """Wrap accelerate's hooked forward: exception safety and, for blocks, activation checkpointing."""
    inner = module.forward

    def guarded(*args: Any, **kwargs: Any) -> Any:
        depth, pending = hook.depth, len(hook._input_devices)
        try:
            return inner(*args, **kwargs)
        except BaseException:
            # accelerate's forward calls post_forward only on success. A method's hook may stop
            # a forward on purpose (svd-llm, minify capture a layer input and raise), and
            # checkpoint's early stop raises inside the re-run: put the CPU weights back.
            hook.unwind(module, depth, pending)
            raise

    if checkpointed:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and _is_block_call_checkpointable(kwargs):
                return checkpoint(guarded, *args, use_reentrant=False, context_fn=_checkpoint_contexts, **kwargs)
            return guarded(*args, **kwargs)
    else:
        forward = guarded
    module.forward = functools.update_wrapper(forward, inner)


@dataclass
class _StreamState:
    execution_device: torch.device
    hooks: dict[nn.Module, StreamHook] = field(default_factory=dict)
    had_forward: dict[nn.Module, bool] = field(default_factory=dict)  # `forward` in its __dict__ before


def is_offloaded(model: nn.Module) -> bool:
    return getattr(model, "_stream_state", None) is not None


def execution_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the execution device under `offloaded`, else its parameters' device."""
    state = getattr(model, "_stream_state", None)
    if state is not None:
        return state.execution_device
    param = next(model.parameters(), None)
    return param.device if param is not None else OFFLOAD_DEVICE


def stream_hooks(model: nn.Module) -> dict[nn.Module, StreamHook]:
    """The hooks `offloaded` attached, by module ({} when the model is not offloaded)."""
    state = getattr(model, "_stream_state", None)
    return dict(state.hooks) if state is not None else {}


@contextlib.contextmanager
def held(module: nn.Module) -> Iterator[None]:
    """Keep a streamed block's weights on the execution device for the duration (no-op otherwise)."""
    hook = getattr(module, "_hf_hook", None)
    if not isinstance(hook, StreamHook):
        yield
        return
    depth = hook.depth
    hook.acquire(module)
    try:
        yield
    finally:
        hook.unwind(module, depth)


def _units(model: nn.Module, blocks: nn.ModuleList) -> list[tuple[nn.Module, bool]]:
    """(module, recurse) for every streamed unit: each block, and each other module owning tensors."""
    inside: set[int] = set()  # the blocks and everything in them
    for block in blocks:
        inside.update(id(m) for m in block.modules())
    units: list[tuple[nn.Module, bool]] = [(b, True) for b in blocks]
    for module in model.modules():
        if id(module) in inside:
            continue
        owns = any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
        if owns or module is model:
            units.append((module, False))
    return units


@contextlib.contextmanager
def offloaded(model: nn.Module, execution_device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Run `model` (weights in CPU memory) on `execution_device`, one decoder block at a time.

    Yields the model itself. On exit every hook is removed, each module's `forward` is its
    class's again, and every parameter and buffer is the CPU tensor it was (or a CPU tensor of
    a module created meanwhile). Nested use with the same device is a no-op.
    """
    device = torch.device(execution_device) if execution_device is not None else default_execution_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"offload to {device} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    state = getattr(model, "_stream_state", None)
    if state is not None:
        if state.execution_device != device:
            raise UserError(f"the model is already offloaded to {state.execution_device}, not {device}")
        yield model
        return
    hooked = [n for n, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None]
    if hooked:
        raise UserError(f"offload: the model already carries accelerate hooks ({hooked[0] or 'the model'}; "
                        "loaded with a device_map?); load it without one, on the CPU")
    elsewhere = [(n, t.device) for n, t in (*model.named_parameters(), *model.named_buffers())
                 if t.device != OFFLOAD_DEVICE]
    if elsewhere:
        name, where = elsewhere[0]
        raise UserError(f"offload keeps the weights in CPU memory, but {name} is on {where}; "
                        "load the model on the CPU (compress.model.load_model(..., device='cpu'))")
    try:
        _, blocks = decoder_layers(model)
    except ValueError as exc:
        raise UserError(f"offload: {exc}") from exc
    state = _StreamState(device)
    try:
        for module, recurse in _units(model, blocks):
            hook = StreamHook(device, recurse=recurse, io_same_device=module is model)
            state.had_forward[module] = "forward" in module.__dict__
            add_hook_to_module(module, hook)
            state.hooks[module] = hook
            _install_forward(module, hook, checkpointed=recurse)
        model._stream_state = state
        yield model
    finally:
        _detach(model, state)


def _detach(model: nn.Module, state: _StreamState) -> None:
    for module, hook in state.hooks.items():
        hook.unwind(module, 0)
        remove_hook_from_module(module)
        if not state.had_forward.get(module, False):
            # remove_hook_from_module leaves the bound method as an instance attribute; drop it
            # so the module is exactly as before (its class's forward).
            module.__dict__.pop("forward", None)
    model.__dict__.pop("_stream_state", None)
    with torch.no_grad():
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(module, kind)
                for name, tensor in list(table.items()):
                    if tensor is not None and tensor.device != OFFLOAD_DEVICE:
                        moved = tensor.detach().to(OFFLOAD_DEVICE)
                        if kind == "_parameters":
                            moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                        table[name] = moved


@contextlib.contextmanager
def maybe_offloaded(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """`offloaded(model)` on the default device if `enabled` and not offloaded already; else nothing."""
    if not isinstance(enabled, bool):
        raise UserError(f"offload must be true or false, got {enabled!r}")
    if not enabled or is_offloaded(model):
        yield model
        return
    with offloaded(model) as streamed:
        yield streamed
