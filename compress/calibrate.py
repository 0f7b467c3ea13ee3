"""Calibration passes: run batches through the model and collect second moments with hooks.

Every Gram matrix comes from `kernels.gram_accumulate`. Layers that read the very same input
tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one Gram: the hook
sees that the tensor object is the one the previous layer just accumulated and skips it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from kernels import gram_accumulate

__all__ = ["InputGrams", "collect_input_grams", "iterate_batches"]


def iterate_batches(
    chunks: Tensor, batch_size: int, device: torch.device, *, progress: bool = True, desc: str = "calibrate"
) -> Iterator[Tensor]:
    """Yield [batch_size, seq_len] slices of `chunks` on `device`, with a progress bar."""
    starts: Iterable[int] = range(0, chunks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
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
    device = next(model.parameters()).device
    gram_device = torch.device(gram_device) if gram_device is not None else device
    grams = InputGrams()
    grams.shared = {}
    last_input: list[Tensor | None] = [None]
    last_owner: list[str | None] = [None]
    tokens = 0

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x is last_input[0]:
                grams.shared[name] = last_owner[0]
                return
            # Holding a reference keeps the tensor alive, so `is` can't be fooled by memory reuse.
            last_input[0], last_owner[0] = x, name
            flat = x.reshape(-1, x.shape[-1])
            if name not in grams:
                grams[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=gram_device)
            gram_accumulate(grams[name], flat.to(gram_device))

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in names]
    try:
        for batch in iterate_batches(chunks, batch_size, device, progress=progress, desc="calibrate"):
            model(input_ids=batch)
            tokens += batch.numel()
            last_input[0] = None
    finally:
        for handle in handles:
            handle.remove()
        last_input[0] = None
    for follower, owner in grams.shared.items():
        grams[follower] = grams[owner]
    missing = [n for n in names if n not in grams]
    if missing:
        raise RuntimeError(f"calibration never reached these layers: {missing[:5]}")
    grams.tokens = tokens
    return grams
