"""The layer ACIP trains: W = U·diag(mask ⊙ s)·Vᵀ (frozen U, s, V) plus a LoRA branch.

The masked product runs through `lowrank_kernels.lowrank_matmul` with the mask folded into the V
factor, so the dense W is never formed. It is wrapped in its own custom op,
``acip::masked_lowrank``, for two reasons:

- its backward computes only what ACIP needs: dL/dx and the mask gradient
  dL/dd_i = Σ_t (g·U)[t, i]·(x·V_sᵀ)[t, i]. The generic lowrank_matmul backward would also
  form the full [out, r] gradient of the folded factor and throw it away;
- selective activation checkpointing can recognise the op and keep its output, so a
  checkpointed block recomputes only the cheap element-wise parts (norms, RoPE, SiLU).

All masks of the model live in one flat `MaskBank`; each layer reads its slice of the
mask values the bank computes once per model forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lowrank_kernels.lowrank_matmul import lowrank_matmul
from torch import Tensor, nn

from compress.methods.acip.functional import Segments, mask_forward

__all__ = ["MaskBank", "MaskedSVDLinear", "masked_lowrank"]


# ---------------------------------------------------------------------------- the custom op
@torch.library.custom_op("acip::masked_lowrank", mutates_args=())
def _masked_lowrank_op(x: Tensor, U: Tensor, Vs: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:
    # V_eff = diag(d)·V_s with d binary in practice, so the fold is exact in any dtype.
    v_eff = Vs * d.to(Vs.dtype)[:, None]
    return lowrank_matmul(x, U, v_eff, bias)


@_masked_lowrank_op.register_fake
def _masked_lowrank_fake(x: Tensor, U: Tensor, Vs: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], U.shape[0]))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, U, Vs, d, _bias = inputs
    ctx.save_for_backward(x, U, Vs, d)


def _backward(ctx, grad: Tensor) -> tuple:
    x, U, Vs, d = ctx.saved_tensors
    need_x, _, _, need_d, _ = ctx.needs_input_grad
    g2 = grad.reshape(-1, U.shape[0])
    gt = g2 @ U  # [T, r]: gradient at the bottleneck, needed by both outputs
    gx = gd = None
    if need_d:
        # Recomputing x·V_sᵀ costs one skinny GEMM; keeping it from the forward would cost
        # T·r activations per layer, which is what limits batch size on 7B models.
        z = x.reshape(-1, Vs.shape[1]) @ Vs.t()
        if gt.dtype in (torch.float16, torch.bfloat16):
            # Products in the compute dtype, the sum over tokens in float32: 5× less memory traffic
            # than upcasting both [T, r] operands, and the per-term rounding (2⁻⁸) is noise here.
            gd = (gt * z).sum(0, dtype=torch.float32).to(d.dtype)
        else:
            gd = (gt * z).sum(0).to(d.dtype)
    if need_x:
        gx = ((gt * d.to(gt.dtype)) @ Vs).reshape(x.shape)
    return gx, None, None, gd, None


_masked_lowrank_op.register_autograd(_backward, setup_context=_setup_context)


def masked_lowrank(x: Tensor, U: Tensor, Vs: Tensor, d: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x·(diag(d)·V_s)ᵀ·Uᵀ + bias, differentiable in x and d (U, V_s, bias are frozen)."""
    return torch.ops.acip.masked_lowrank(x, U, Vs, d, bias)


# ---------------------------------------------------------------------------- modules
class MaskBank(nn.Module):
    """All mask parameters of a model as one flat float32 vector, split into layer segments.

    `refresh()` computes the straight-through mask values once per model forward; layers
    read their slice from `values`. Float32 matters: an AdamW step of 5e-5 on a value of
    2e-2 is below bfloat16's resolution.
    """

    def __init__(self, segments: Segments, scale: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.segments = segments
        self.scale = float(scale)
        self.p = nn.Parameter(torch.full((segments.total,), self.scale, dtype=torch.float32, device=device))
        self.register_buffer("layer_index", segments.layer_index(device), persistent=False)
        self.values: Tensor | None = None
        self._offsets = segments.offsets
        # Training-loss settings read by the ACIP step (compress.methods.acip.train): distillation weight, whether
        # the NLL term is dropped, and `teacher` (while True every layer runs with all masks on, no LoRA).
        self.distill = 0.0
        self.distill_only = False
        self.teacher = False

    def refresh(self) -> Tensor:
        # mask_forward has value 1[p>0]·scale; dividing by scale gives the layer a 0/1 mask whose
        # gradient w.r.t. p is 1/scale (the reference folds the same factor into its SVD factors).
        self.values = mask_forward(self.p, self.scale) / self.scale
        return self.values

    def slice(self, layer: int) -> Tensor:
        if self.values is None:
            self.refresh()
        start = self._offsets[layer]
        return self.values[start : start + self.segments.lengths[layer]]


class MaskedSVDLinear(nn.Module):
    """ACIP's parametrisation of one linear layer, used only while scoring.

    Buffers: U [out, k] and V_s = diag(s)·Vᵀ [k, in] in the model's dtype (frozen), the
    bias if any. Parameters: the LoRA branch (float32, A [r, in], B [out, r]). The mask is
    the layer's slice of a shared `MaskBank`.
    """

    def __init__(
        self,
        U: Tensor,
        Vs: Tensor,
        bias: Tensor | None,
        bank: MaskBank,
        layer: int,
        *,
        lora_rank: int = 32,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
    ) -> None:
        super().__init__()
        self.out_features, self.k = U.shape
        self.in_features = Vs.shape[1]
        self.register_buffer("U", U.contiguous())
        self.register_buffer("Vs", Vs.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # The bank is shared by all layers: keep it out of this module's children so that
        # named_parameters() lists it once, on the bank itself.
        object.__setattr__(self, "_bank", bank)
        self.layer = layer
        self.lora_rank = int(lora_rank)
        self.lora_scaling = float(lora_alpha) / lora_rank if lora_rank > 0 else 0.0
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if self.lora_rank > 0:
            factory = {"dtype": torch.float32, "device": U.device}
            self.lora_A = nn.Parameter(torch.empty(lora_rank, self.in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora_rank, **factory))
            # PEFT's default: A like nn.Linear's init, B zero, so the branch starts as a no-op.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.lora_A = self.lora_B = None

    @property
    def bank(self) -> MaskBank:
        return self._bank

    def forward(self, x: Tensor) -> Tensor:
        d = self._bank.slice(self.layer)
        if self._bank.teacher:  # distillation's teacher: the full-rank factorization, i.e. the dense layer
            return masked_lowrank(x, self.U, self.Vs, torch.ones_like(d), self.bias)
        y = masked_lowrank(x, self.U, self.Vs, d, self.bias)
        if self.lora_A is not None:
            h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
            y = y + F.linear(h, self.lora_B.to(x.dtype)) * self.lora_scaling
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"lora_rank={self.lora_rank}, layer={self.layer}")
