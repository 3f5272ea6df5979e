"""Weight-only int8 quantization (`--quant int8`): lossy, opt-in, about 4x fewer bytes.

Each matrix becomes int8 values with one scale per output channel (symmetric, max-abs / 127),
as llama.cpp's Q8_0 does per block of 32. Batch-1 decoding reads every weight once per token,
so fewer bytes is more tokens per second. On CPUs `torch._weight_int8pack_mm` multiplies
int8 weights directly, fastest with bfloat16 activations, so the matrix products take their
input in bfloat16 and give float32 back; norms, attention and the residual stream stay in the
model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .model import GPT, Linear

QUANT_MODES = ("none", "int8")


class Int8Linear(nn.Module):
    """y = x @ Wᵀ with W stored int8 [out, in] and float scales [out]."""

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().t()  # [in, out] -> [out, in]
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight_int8 = nn.Parameter(quantized.contiguous(), requires_grad=False)
        # The kernel wants scales in the activations' dtype; keep both copies (tiny).
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.scale_bf16 = nn.Parameter(scale.to(torch.bfloat16), requires_grad=False)
        self.bias = linear.bias
        self.fused_kernel = self.weight_int8.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [B, T, in] -> [B*T, in]
        if self.fused_kernel:
            y = torch._weight_int8pack_mm(
                flat.to(torch.bfloat16), self.weight_int8, self.scale_bf16
            )
        else:  # other devices: dequantize on the fly (correct, not the fast path)
            y = (flat.to(torch.bfloat16) @ self.weight_int8.t().to(torch.bfloat16)) * (
                self.scale_bf16
            )
        y = y.to(x.dtype).view(*x.shape[:-1], -1)  # [B*T, out] -> [B, T, out]
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows for ids, for a tied head used as the input embedding."""
        return self.weight_int8[ids].float() * self.scale[ids, None]


def quantize_int8(model: GPT) -> GPT:
    """Replace every Linear (attention, MLP and head) with an Int8Linear, in place."""
    if model.dtype != torch.float32:
        raise UsageError("--quant int8 works from float32 weights; use --dtype float32")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, name, Int8Linear(child))
    return model
