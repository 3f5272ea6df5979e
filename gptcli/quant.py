"""Weight-only int8 quantization (placeholder: being written)."""

from __future__ import annotations

from .errors import UsageError
from .model import GPT


def quantize_int8(model: GPT) -> GPT:
    """Replace every matrix with int8 weights and per-output-channel scales, in place."""
    raise UsageError("--quant int8 is not available yet")
