"""A decode loop a serving stack can take as is: static KV cache + one CUDA-graph replay per token.

Plain `generate` spends most of a small model's decode step launching kernels from Python
(for SmolLM2-135M, eager decode runs orders of magnitude below its memory floor; the measured
figures are in bench/results/e2e_*.json). Here the
prefill runs once eagerly at full length (large-T kernel paths), then the one-token decode step
is captured once into a CUDA graph per batch size and replayed for every new token, with the
token and its position written into static input buffers.

Works for dense and compressed checkpoints alike (`LowRankLinear`, narrowed `nn.Linear`), since
it only calls the model's own forward. That includes attention layers narrowed by whole KV groups,
so that layers hold different numbers of heads: transformers' `StaticCache` (4.56 through 5.23 at
least) allocates each layer's buffers lazily from the first key/value states that layer writes,
not from ``config.num_key_value_heads``. On the CPU (or with ``use_cuda_graph=False``) the same
loop runs eagerly, which is what the CPU tests compare against `generate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["COMPILE_MODES", "DecodeStats", "GraphedDecoder", "cache_keyword", "capture_cuda_graph",
           "enable_dense_fallback"]

T = TypeVar("T")


def cache_keyword(model: nn.Module) -> str:
    """The keyword `model`'s forward takes its KV cache by: "cache" (transformers ≥ 5.24) or "past_key_values".

    transformers renamed the argument and warns on the old name (to be removed in 5.40); older releases
    take only the old one, so the name is read from the forward's signature.
    """
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def enable_dense_fallback(model: nn.Module, tokens: Sequence[int] | None = None) -> dict[str, bool]:
    """Give every `LowRankLinear` of `model` a dense copy where one dense GEMM is faster at `tokens` rows.

    `tokens`: the row counts the server runs (decode batch sizes, prefill lengths; default
    `lowrank.linear.DECODE_TOKENS`). Returns {layer name: whether it now holds a dense copy}. The
    model computes the same function; it holds more weights (out·in per converted layer), so this
    trades the memory saving for speed on layers too small for the factorized kernels to win.
    """
    from lowrank.linear import DECODE_TOKENS, LowRankLinear

    tokens = tuple(tokens) if tokens is not None else DECODE_TOKENS
    return {name: module.enable_dense_fallback(tokens)
            for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def capture_cuda_graph(fn: Callable[[], T], warmup: Sequence[Callable[[], object]] = ()) -> tuple[object, T]:
    """Record one call of ``fn`` into a CUDA graph; returns (graph, what the recorded call returned).

    The ``warmup`` calls run first on a side stream, so that lazy initialisation (cuBLAS handles,
    Triton compiles, autotuning, allocator pools) happens outside the capture, as CUDA graphs
    require. What ``fn`` returned lives in the graph's memory pool: each ``graph.replay()``
    rewrites it in place.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in warmup:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@dataclass
class DecodeStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    batch_size: int = 0


# torch.compile modes that leave CUDA-graph capture to GraphedDecoder ("reduce-overhead" and
# "max-autotune" record graphs of their own, which cannot nest inside the decoder's capture).
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


class GraphedDecoder:
    """Greedy decoding with a static cache; the per-token step is a CUDA graph replay on GPU.

    ``GraphedDecoder(model, max_cache_len=768).generate(input_ids, max_new_tokens=256)`` returns
    the prompt followed by the new tokens, like `model.generate(..., do_sample=False)`.
    """

    def __init__(self, model: nn.Module, *, max_cache_len: int, use_cuda_graph: bool | None = None,
                 compile: bool | str | Callable = False, compile_mode: str | None = None) -> None:
        """`compile` runs the decode step through `torch.compile(fullgraph=True)` before the graph is
        captured (True: inductor; a string or a callable names another backend), fusing the norms,
        rotary embeddings and residual adds that otherwise cost one small kernel launch each.
        `compile_mode` is torch.compile's mode, one of `COMPILE_MODES` (None: its default);
        "max-autotune-no-cudagraphs" lets inductor time Triton GEMM templates against cuBLAS and fuse
        neighbours into them. Modes that capture CUDA graphs themselves are refused: this class
        captures the step already."""
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if compile_mode is not None and not compile:
            raise ValueError("compile_mode needs compile=True (or a backend)")
        self.model = model.eval()
        self._cache_kwarg = cache_keyword(model)
        self._step_forward = self._forward
        if compile:
            backend = "inductor" if compile is True else compile if callable(compile) else str(compile)
            self._step_forward = torch.compile(self._forward, backend=backend, fullgraph=True, dynamic=False,
                                               mode=compile_mode)
        self.device = next(model.parameters()).device
        self.max_cache_len = max_cache_len
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor, object]] = {}
        self._caches: dict[int, object] = {}
        self.stats = DecodeStats()

    # ------------------------------------------------------------------ cache
    def _cache(self, batch_size: int):
        from transformers import StaticCache

        cache = self._caches.get(batch_size)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            self._caches[batch_size] = cache
        return cache

    def _forward(self, tokens: Tensor, positions: Tensor, cache) -> Tensor:
        out = self.model(input_ids=tokens, **{self._cache_kwarg: cache}, cache_position=positions,
                         position_ids=positions.unsqueeze(0).expand(tokens.shape[0], -1), use_cache=True)
        return out.logits[:, -1, :]

    # ------------------------------------------------------------------ graph capture
    def _capture(self, batch_size: int, cache) -> tuple:
        """Record one decode step for this batch size (the cache is already initialised by a prefill)."""
        token_buf = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        pos_buf = torch.full((1,), self.max_cache_len - 1, dtype=torch.long, device=self.device)
        # The scratch position is overwritten by every real step; the warm-up steps only have to run.

        def step() -> tuple[Tensor, Tensor]:
            logits = self._step_forward(token_buf, pos_buf, cache)
            return logits, logits.argmax(dim=-1, keepdim=True)

        warm = lambda: self._step_forward(token_buf, pos_buf, cache)  # noqa: E731  (compiles outside the capture)
        graph, (_, next_buf) = capture_cuda_graph(step, warmup=[warm, warm])
        return graph, token_buf, pos_buf, next_buf, cache

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def begin(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Reset the cache, prefill the prompt and return the first new token, [batch, 1].

        Captures the decode-step graph for this batch size on first use. `step` then continues
        from position ``prompt_len``; `generate` is `begin` followed by ``max_new_tokens - 1`` steps.
        """
        batch_size, prompt_len = self._check(input_ids, max_new_tokens)
        input_ids = input_ids.to(self.device)
        cache = self._cache(batch_size)
        cache.reset()
        positions = torch.arange(prompt_len, device=self.device)
        if self.use_cuda_graph and max_new_tokens > 1 and batch_size not in self._graphs:
            # Capture needs an initialised cache (a prefill), and its warm-up steps advance the
            # cache's own write counters (newer transformers track the fill level on the
            # device). So: prefill, capture, then reset and prefill again for real. The reset
            # works in place, so the graph keeps pointing at the same buffers.
            self._forward(input_ids, positions, cache)
            self._graphs[batch_size] = self._capture(batch_size, cache)
            cache.reset()
        t0 = time.perf_counter()
        token = self._forward(input_ids, positions, cache).argmax(dim=-1, keepdim=True)
        self._sync()
        self.stats = DecodeStats(time.perf_counter() - t0, 0.0, 1, batch_size)
        return token

    @torch.inference_mode()
    def step(self, token: Tensor, position: int, *, eager: bool = False) -> Tensor:
        """One decode step: feed ``token`` [batch, 1] at ``position``, return the next greedy token.

        Replays the captured graph where there is one (unless ``eager``); its result is a static
        buffer that the next replay overwrites, so copy it if it must outlive the next step.
        """
        captured = self._graphs.get(token.shape[0])
        if self.use_cuda_graph and captured is not None and not eager:
            graph, token_buf, pos_buf, next_buf, _ = captured
            token_buf.copy_(token)
            pos_buf.fill_(position)
            graph.replay()
            return next_buf
        pos = torch.tensor([position], device=self.device)
        forward = self._forward if eager else self._step_forward
        return forward(token, pos, self._cache(token.shape[0])).argmax(-1, keepdim=True)

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation: returns [batch, prompt + max_new_tokens] token ids."""
        batch_size, prompt_len = self._check(input_ids, max_new_tokens)
        if max_new_tokens <= 0:
            return input_ids
        token = self.begin(input_ids, max_new_tokens)
        prefill_seconds = self.stats.prefill_seconds
        out = torch.empty(batch_size, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0:1] = token
        t1 = time.perf_counter()
        for step in range(1, max_new_tokens):
            out[:, step : step + 1] = self.step(out[:, step - 1 : step], prompt_len + step - 1)
        self._sync()
        decode_seconds = time.perf_counter() - t1
        self.stats = DecodeStats(prefill_seconds, decode_seconds, max_new_tokens - 1, batch_size)
        return torch.cat([input_ids.to(self.device), out], dim=1)

    def _check(self, input_ids: Tensor, max_new_tokens: int) -> tuple[int, int]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt_len], got shape {tuple(input_ids.shape)}")
        batch_size, prompt_len = input_ids.shape
        if prompt_len + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt ({prompt_len}) + new tokens ({max_new_tokens}) exceed max_cache_len={self.max_cache_len}"
            )
        return batch_size, prompt_len

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
