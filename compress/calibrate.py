"""Calibration passes: run batches through the model and collect second moments with hooks.

Every Gram matrix comes from `lowrank_kernels.gram.gram_accumulate`. Layers that read the very same input
tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one Gram: the hook
sees that the tensor object is the one the previous layer just accumulated and skips it.

Two orders: `collect_input_grams` runs each batch through the whole model (every layer's Gram
is alive at once, on one device); `blockwise_input_grams` runs every batch through one decoder
block before the next (the block-sequential order of SVD-LLM's update), so only one block's
Grams and, under `compress.streaming.offloaded`, one block's weights are on the accelerator at a
time. Both give the same Grams: each is accumulated over the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lowrank_kernels.gram import gram_accumulate
from torch import Tensor, nn

from compress.streaming import execution_device, held, recomputing
from lowrank.faults import fault_point
from lowrank.surgery import decoder_layers

__all__ = ["FISHER_LABELS", "InputGrams", "KfacFactors", "activation_gradients", "block_output",
           "blockwise_input_grams", "collect_input_grams", "collect_kfac", "first_block_inputs", "gram_rows",
           "iterate_batches"]


def iterate_batches(
    chunks: Tensor, batch_size: int, device: torch.device, *, progress: bool = True, desc: str = "calibrate"
) -> Iterator[Tensor]:
    """Yield [batch_size, seq_len] slices of `chunks` on `device`, with a progress bar."""
    starts: Iterable[int] = range(0, chunks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        fault_point(desc)  # fault suite: stop here (tests/compress/test_faults.py); inert otherwise
        yield chunks[start : start + batch_size].to(device)


class InputGrams(dict):
    """{layer name: fp32 Gram Σ xᵀx of its inputs}; layers with a shared input share the tensor.

    `tokens` is the number of rows accumulated; `shared` maps a follower layer to the layer
    whose Gram it shares.
    """

    tokens: int = 0
    shared: dict[str, str]


@torch.no_grad()
def collect_input_grams(
    model: nn.Module,
    chunks: Tensor,
    layer_names: Iterable[str],
    *,
    batch_size: int = 4,
    progress: bool = True,
    gram_device: torch.device | str | None = None,
) -> InputGrams:
    """Accumulate G = Σ xᵀx (fp32) of the inputs of each named linear over all calibration chunks."""
    names = list(layer_names)
    modules = {name: model.get_submodule(name) for name in names}
    device = execution_device(model)
    accumulator = _GramHooks(torch.device(gram_device) if gram_device is not None else device)
    tokens = 0
    handles = [modules[name].register_forward_pre_hook(accumulator.hook(name)) for name in names]
    try:
        for batch in iterate_batches(chunks, batch_size, device, progress=progress, desc="calibrate"):
            model(input_ids=batch)
            tokens += batch.numel()
            accumulator.next_input()
    finally:
        for handle in handles:
            handle.remove()
        accumulator.next_input()
    grams = accumulator.finish(names)
    grams.tokens = tokens
    return grams


class _GramHooks:
    """Forward pre-hooks accumulating G = Σ xᵀx of each named layer's input into one `InputGrams`.

    Layers that read the very same input tensor (q/k/v after the attention norm, gate/up after
    the MLP norm) share one Gram: a hook that sees the tensor the previous hook just accumulated
    records itself as a follower instead. `gram_device` None keeps each Gram on its input's device.
    """

    def __init__(self, gram_device: torch.device | None = None) -> None:
        self.grams = InputGrams()
        self.grams.shared = {}
        self.gram_device = gram_device
        self._last_input: Tensor | None = None
        self._last_owner: str | None = None

    def hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x is self._last_input:
                self.grams.shared[name] = self._last_owner
                return
            # Holding a reference keeps the tensor alive, so `is` can't be fooled by memory reuse.
            self._last_input, self._last_owner = x, name
            rows = gram_rows(x)
            if self.gram_device is not None:
                rows = rows.to(self.gram_device)
            if name not in self.grams:
                self.grams[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
            gram_accumulate(self.grams[name], rows)

        return hook

    def next_input(self) -> None:
        """Between forward passes: a new input tensor can never be shared with the last pass's."""
        self._last_input = self._last_owner = None

    def finish(self, names: list[str]) -> InputGrams:
        """Point every follower at its owner's Gram; every named layer must have been reached."""
        for follower, owner in self.grams.shared.items():
            self.grams[follower] = self.grams[owner]
        missing = [n for n in names if n not in self.grams]
        if missing:
            raise RuntimeError(f"calibration never reached these layers: {missing[:5]}")
        return self.grams


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the first decoder block's inputs are captured."""


def block_output(out: Any) -> Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def first_block_inputs(model: nn.Module, ids: Tensor, batch_size: int) -> Iterator[tuple[Tensor, dict]]:
    """(hidden states, keyword arguments) that the first decoder block receives, per batch.

    The forward stops at the first block, so only the embeddings run. Replaying
    `block(hidden, **kwargs)` block after block reproduces the model's own hidden states.
    """
    _, blocks = decoder_layers(model)
    device = execution_device(model)
    seen: list[tuple[Tensor, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        seen.append((hidden.detach(), rest))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in iterate_batches(ids, batch_size, device, progress=False):
            try:
                with torch.no_grad():
                    model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            yield seen.pop()
    finally:
        handle.remove()


def _block_of(name: str, prefix: str) -> int:
    if not name.startswith(prefix + "."):
        raise ValueError(f"{name} is not inside the decoder blocks ({prefix})")
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def blockwise_input_grams(
    model: nn.Module,
    chunks: Tensor,
    layer_names: Iterable[str],
    *,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "calibrate (blockwise)",
) -> Iterator[tuple[int, InputGrams]]:
    """`collect_input_grams`, one decoder block at a time: yields (block index, that block's Grams).

    Every batch goes through block i (hooks accumulate the Grams of its named layers), then
    the outputs become block i+1's inputs. The Grams are on the execution device, and under
    `compress.streaming.offloaded` the block stays `held` there until the consumer resumes the
    iteration: per-layer math on the yielded Grams reads the block's weights on that device,
    and nothing else of the model is there. The hidden states of all calibration sequences
    stay on the execution device (n·seq_len·hidden values, twice during a block).
    `tokens` of every yielded InputGrams is the whole calibration set's token count.
    """
    names = list(layer_names)
    prefix, blocks = decoder_layers(model)
    by_block: dict[int, list[str]] = {}
    for name in names:
        by_block.setdefault(_block_of(name, prefix), []).append(name)
    if not by_block:
        return
    inputs = list(first_block_inputs(model, chunks, batch_size))
    hidden = [x for x, _ in inputs]
    kwargs = [kw for _, kw in inputs]
    del inputs
    tokens = int(chunks.numel())
    last_block = max(by_block)
    indices: Iterable[int] = range(last_block + 1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=desc, unit="block", leave=False)
    for i in indices:
        block = blocks[i]
        with held(block):
            wanted = by_block.get(i, [])
            accumulator = _GramHooks()
            handles = [model.get_submodule(n).register_forward_pre_hook(accumulator.hook(n)) for n in wanted]
            try:
                with torch.no_grad():
                    for b, kw in enumerate(kwargs):
                        out = block_output(block(hidden[b], **kw))
                        accumulator.next_input()
                        # Only a later block with targets needs this block's outputs.
                        hidden[b] = out if i < last_block else hidden[b]
            finally:
                for handle in handles:
                    handle.remove()
                accumulator.next_input()
            if not wanted:
                continue
            grams = accumulator.finish(wanted)
            grams.tokens = tokens
            yield i, grams
            del grams, accumulator


FISHER_LABELS = ("model", "data")


class KfacFactors:
    """K-FAC factors of linear layers: A = E[a·aᵀ] over inputs, G = E[g·gᵀ] over output gradients.

    Both are fp32 means over the calibration tokens. `input_grams[name]` is shared (the same
    tensor) by layers that read the same input; `output_grams[name]` is per layer.
    """

    def __init__(self) -> None:
        self.input_grams: dict[str, Tensor] = {}
        self.output_grams: dict[str, Tensor] = {}
        self.tokens = 0
        self.seconds = 0.0


def gram_rows(x: Tensor) -> Tensor:
    """`x` as detached [tokens, features] rows for `lowrank_kernels.gram.gram_accumulate`.

    The Gram kernel takes 16/32-bit floats; an fp64 model (used in tests) goes through fp32.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def activation_gradients(model: nn.Module) -> Iterator[None]:
    """Backward passes that reach every activation but no parameter.

    Parameters are frozen and the embedding output becomes the graph's only leaf, so a backward
    computes activation gradients (what Taylor scores and K-FAC need) without weight-gradient
    GEMMs or .grad memory. The model runs in eval mode; everything is restored on exit.
    """

    def embed_hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(embed_hook)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def collect_kfac(
    model: nn.Module,
    chunks: Tensor,
    layer_names: Iterable[str],
    *,
    labels: str = "model",
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    desc: str = "curvature",
) -> KfacFactors:
    """One forward + backward per batch, accumulating each named linear's K-FAC factors.

    `labels="model"` samples every position's label from the model's own predictive
    distribution (the true Fisher); `"data"` uses the next token (the empirical Fisher). The
    loss is the sum of token NLLs, so each output gradient g is one token's own gradient, and
    both factors are divided by the token count at the end.

    Parameters are frozen during the pass and the graph starts at the embedding output, so
    only activation gradients are computed: no weight-gradient GEMMs and no .grad memory.
    """
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, got {labels!r}")
    names = list(layer_names)
    modules = {name: model.get_submodule(name) for name in names}
    device = execution_device(model)
    factors = KfacFactors()
    last_input: list[Tensor | None] = [None]
    last_owner: list[str | None] = [None]
    shared: dict[str, str] = {}

    def accumulate(store: dict[str, Tensor], name: str, rows: Tensor) -> None:
        if name not in store:
            store[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        gram_accumulate(store[name], rows)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if recomputing():  # a checkpointed block re-running for the backward: already recorded
                return
            x = args[0]
            if x is last_input[0]:
                shared[name] = last_owner[0]
            else:
                last_input[0], last_owner[0] = x, name
                accumulate(factors.input_grams, name, gram_rows(x))
            if out.requires_grad:
                out.register_hook(lambda grad: accumulate(factors.output_grams, name, gram_rows(grad)))

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    try:
        with activation_gradients(model):
            for batch in iterate_batches(chunks, batch_size, device, progress=progress, desc=desc):
                logits = model(input_ids=batch, use_cache=False).logits
                last_input[0] = None
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                if labels == "model":
                    with torch.no_grad():
                        probs = torch.softmax(logits.flatten(0, 1), dim=-1)
                        target = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                        del probs
                    flat = logits.flatten(0, 1)
                else:
                    target = batch[:, 1:].flatten()
                    flat = logits[:, :-1].flatten(0, 1)
                loss = nn.functional.cross_entropy(flat, target, reduction="sum")
                del logits, flat
                loss.backward()
                factors.tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        last_input[0] = None
    for follower, owner in shared.items():
        factors.input_grams[follower] = factors.input_grams[owner]
    missing = [n for n in names if n not in factors.input_grams or n not in factors.output_grams]
    if missing:
        raise RuntimeError(f"the curvature pass never reached these layers: {missing[:5]}")
    scale = 1.0 / max(factors.tokens, 1)
    seen: set[int] = set()
    for store in (factors.input_grams, factors.output_grams):
        for g in store.values():
            if id(g) not in seen:  # shared input Grams are scaled once
                seen.add(id(g))
                g.mul_(scale)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    factors.seconds = time.perf_counter() - t0
    return factors
