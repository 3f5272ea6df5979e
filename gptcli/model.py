"""The GPT itself: token ids and positions in, logits out, with a key/value cache.

One decoder-only transformer covers both checkpoint families; `ModelConfig.family` picks
the parts that differ:

| part           | gpt2                      | llama                          |
|----------------|---------------------------|--------------------------------|
| positions      | learned table added to x  | RoPE applied to q and k        |
| norm           | LayerNorm (weight + bias) | RMSNorm (weight)               |
| MLP            | GELU(tanh), with biases   | SwiGLU, no biases              |
| key/value heads| = query heads             | may be fewer (grouped-query)   |

Every matrix is stored `[in, out]`, so a layer is `x @ weight (+ bias)`. On CPUs this layout
makes the batch-1 matrix-vector products of decoding faster than `F.linear`'s `[out, in]`
(measured in DESIGN.md), and GPT-2 checkpoints already store it. The module knows nothing of
files, tokenizers or terminals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def _onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel (CPU builds for x86 and ARM do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class Linear(nn.Module):
    """y = x @ weight + bias, with weight stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(d_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _ONEDNN_LINEAR
            and x.device.type == "cpu"
            and x.dtype in _ONEDNN_DTYPES
            and not torch.compiler.is_compiling()  # inductor makes its own choice of kernel
        ):
            # On the CPU, oneDNN's kernel reads the weights with both cores where MKL's
            # matrix-vector product uses one: measured 35 vs 23 GB/s over SmolLM2's layers
            # (README, "Decode speed"). weight.t() is [out, in] in column-major order, which
            # oneDNN takes as it is (no copy).
            return torch.ops.mkldnn._linear_pointwise(x, self.weight.t(), self.bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight).view(*x.shape[:-1], -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the [out, in] matrix for ids: a tied head's use as the input embedding."""
        return self.weight.t()[ids]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused kernel instead of six small ops: the same numbers, measurably faster
            # per decode step.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half precision: normalise in float32, round, then scale, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "gpt2":
        norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        norm.requires_grad_(False)
        return norm
    return RMSNorm(config.d_model, config.norm_eps)


class KVCache:
    """Keys and values of every layer, allocated once for the whole request.

    Shapes: `k[layer]`, `v[layer]` are `[batch, n_kv_head, max_len, head_dim]`; a forward
    pass writes its new keys and values at their absolute positions.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.n_layer, batch, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


class Rotary:
    """RoPE tables, in the half-split layout HF Llama checkpoints expect.

    HF rotates x by `x * cos + rotate_half(x) * sin` with rotate_half(x) = [-x2, x1]. Here
    the sign lives in the table instead (`sin_signed` = [-sin, sin] by halves), so that
    rotate_half becomes a plain roll by half a head: the same products, fewer ops per step.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        # Built on the CPU explicitly: models are constructed under torch.device("meta").
        cpu = torch.device("cpu")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=cpu) / head_dim
        inv_freq = 1.0 / (theta**exponents)
        positions = torch.arange(max_positions, dtype=torch.float32, device=cpu)
        angles = torch.outer(positions, inv_freq)  # [max_positions, head_dim/2]
        self.cos = torch.cat([angles.cos(), angles.cos()], dim=-1)  # [max_positions, head_dim]
        self.sin_signed = torch.cat([-angles.sin(), angles.sin()], dim=-1)

    def to(self, device: torch.device) -> Rotary:
        self.cos, self.sin_signed = self.cos.to(device), self.sin_signed.to(device)
        return self

    def tables(self, start: int, length: int, dtype: torch.dtype) -> RopeTables:
        """cos and signed sin for positions start..start+length-1, as [T, 1, head_dim]."""
        cos = self.cos[start : start + length, None].to(dtype)
        sin = self.sin_signed[start : start + length, None].to(dtype)
        return cos, sin

    def tables_at(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """cos and signed sin for per-row positions [B, T], as [B, T, 1, head_dim]."""
        cos = self.cos[positions][:, :, None].to(dtype)
        sin = self.sin_signed[positions][:, :, None].to(dtype)
        return cos, sin


RopeTables = tuple[torch.Tensor, torch.Tensor]


def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Apply RoPE to x [B, T, heads, head_dim]; tables broadcast over batch and heads."""
    cos, sin_signed = rope
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def causal_mask(start: int, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """[n_queries, n_keys] booleans: query at position start+i may see keys at positions <= it."""
    query_pos = torch.arange(start, start + n_queries, device=device)[:, None]
    key_pos = torch.arange(n_keys, device=device)[None, :]
    return key_pos <= query_pos


def padded_causal_mask(
    start: int, n_queries: int, n_keys: int, left_pad: torch.Tensor
) -> torch.Tensor:
    """[B, 1, n_queries, n_keys] booleans for left-padded rows: the causal mask, minus each row's
    first left_pad[b] slots. A pad slot's own query sees itself only, so that no softmax row is
    empty (an empty one would be NaN, and NaN times a zero weight still poisons the output)."""
    causal = causal_mask(start, n_queries, n_keys, left_pad.device)  # [T, S]
    key_slot = torch.arange(n_keys, device=left_pad.device)
    not_pad = key_slot[None, :] >= left_pad[:, None]  # [B, S]
    query_slot = torch.arange(start, start + n_queries, device=left_pad.device)
    itself = key_slot[None, :] == query_slot[:, None]  # [T, S]
    return ((causal & not_pad[:, None, :]) | itself)[:, None]  # [B, 1, T, S]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook scaled dot product, returning the output and the attention weights.

    q [B, H, T, D], k and v [B, H, S, D], mask [T, S] or [B, 1, T, S] (True = may attend) or
    None.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # each row sums to 1
    return weights @ v, weights  # [B, H, T, D], [B, H, T, S]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        self.layer = layer
        bias = config.family == "gpt2"
        # Q, K and V projections fused into one matrix: one matmul per step instead of three.
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = Linear(config.d_model, qkv_out, bias)
        self.out = Linear(config.d_model, config.d_model, bias)
        self.weights: torch.Tensor | None = None  # filled when recording attention

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache | None,
        rope: RopeTables | None,
        record: bool = False,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`pad_mask`: a left-padded batch's [B, 1, T, S] mask (`padded_causal_mask`), or None
        when no row is padded (then the causal structure alone decides, as below)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim

        # 1. Project to queries, keys and values, and 2. split into heads:
        # [B, T, (H + 2*H_kv)*D] -> [B, T, H + 2*H_kv, D].
        qkv = self.qkv(x).view(B, T, H + 2 * H_kv, D)
        qk, v = qkv[:, :, : H + H_kv], qkv[:, :, H + H_kv :]
        if rope is not None:
            qk = rotate(qk, rope)  # queries and keys rotated together: one set of ops
        # [B, T, heads, D] -> [B, heads, T, D]
        q = qk[:, :, :H].transpose(1, 2)
        k = qk[:, :, H:].transpose(1, 2)
        v = v.transpose(1, 2)

        # Keys and values of earlier positions come from the cache; ours are written into it.
        if cache is not None:
            cache.k[self.layer, :B, :, start : start + T] = k
            cache.v[self.layer, :B, :, start : start + T] = v
            k = cache.k[self.layer, :B, :, : start + T]  # [B, H_kv, S, D]
            v = cache.v[self.layer, :B, :, : start + T]
        S = k.shape[2]

        # 3. softmax(Q Kᵀ / √D + causal mask) V, per head. With grouped-query attention each
        # key/value head serves H / H_kv query heads (enable_gqa shares them without copies).
        if record:
            if H_kv != H:
                k = k.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, D]
                v = v.repeat_interleave(H // H_kv, dim=1)
            mask = pad_mask if pad_mask is not None else causal_mask(start, T, S, x.device)
            y, self.weights = attend(q, k, v, mask)
        elif pad_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask, enable_gqa=H_kv != H)
        elif T == S:
            # Fast path; is_causal is right only because queries and keys line up.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H_kv != H)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=H_kv != H)
        else:
            mask = causal_mask(start, T, S, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H_kv != H)

        # 4. Concatenate heads: [B, H, T, D] -> [B, T, H*D]; 5. output projection.
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.family == "llama"
        if self.gated:
            # SwiGLU: gate and up projections fused, [d_model, 2*d_ff].
            self.up = Linear(config.d_model, 2 * config.d_ff, bias=False)
            self.down = Linear(config.d_ff, config.d_model, bias=False)
        else:
            self.up = Linear(config.d_model, config.d_ff, bias=True)
            self.down = Linear(config.d_ff, config.d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache | None,
        rope: RopeTables | None,
        record: bool,
        pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start, cache, rope, record, pad_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Parameters (all frozen; this is inference only):

    - `tok_emb` [vocab, d_model] token embedding, absent when the head is tied;
    - `pos_emb` [max_positions, d_model] (gpt2 only);
    - `head` a [d_model -> vocab] Linear; when tied it also serves as the embedding, looked up
      by column (`Linear.rows`), so the shared matrix is held once, in the fast layout.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, vocab = config.d_model, config.vocab_size
        self.tok_emb = None if config.tie_embeddings else nn.Parameter(torch.empty(vocab, d), False)
        self.pos_emb = (
            nn.Parameter(torch.empty(config.max_positions, d), False)
            if config.family == "gpt2"
            else None
        )
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.head = Linear(d, vocab, bias=False)
        self.rotary = (
            Rotary(config.head_dim, config.rope_theta, config.max_positions)
            if config.family == "llama"
            else None
        )

    def to_device(self, device: torch.device | str) -> GPT:
        self.to(device)
        if self.rotary is not None:
            self.rotary.to(torch.device(device))
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (weights may be stored otherwise, e.g. int8)."""
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, d_model]."""
        if self.tok_emb is not None:
            return self.tok_emb[ids]
        return self.head.rows(ids)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        start: int = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
        record_attention: bool = False,
        *,
        left_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] at positions start..start+T-1.

        With a cache, keys and values of positions < start are read from it and the new ones
        written; without one, `start` must be 0. `last_only` computes logits for the last
        position alone (all that generation needs), saving a [T, vocab] product in prefill.

        `left_pad` [B] (int64, on the model's device) makes a left-padded batch of rows of
        different lengths: `start` and the cache then count slots shared by every row, row b's
        first left_pad[b] slots are padding that no query attends to, and its tokens sit at
        positions slot - left_pad[b]. So every row's next token goes into the same slot, and each
        row computes what it would alone. None (no padding) keeps the unpadded fast paths.
        """
        T = ids.shape[1]
        first = start if left_pad is None else start - int(left_pad.min())
        if first + T > self.config.max_positions:
            raise ValueError(
                f"positions up to {first + T} exceed the model's {self.config.max_positions}"
            )
        x = self.embed(ids)
        pad_mask = None
        if left_pad is None:
            if self.pos_emb is not None:
                x = x + self.pos_emb[start : start + T]
            rope = self.rotary.tables(start, T, x.dtype) if self.rotary is not None else None
        else:
            x, rope, pad_mask = self._left_padded(x, start, left_pad)
        for block in self.blocks:
            x = block(x, start, cache, rope, record_attention, pad_mask)
        if last_only:
            x = x[:, -1:]
        return self.head(self.final_norm(x))

    def _left_padded(
        self, x: torch.Tensor, start: int, left_pad: torch.Tensor
    ) -> tuple[torch.Tensor, RopeTables | None, torch.Tensor]:
        """Per-row positions (learned or RoPE) and the pad-aware causal mask of a padded batch."""
        T = x.shape[1]
        slots = torch.arange(start, start + T, device=x.device)
        # Pad slots would get negative positions; 0 keeps their (never attended) outputs finite.
        positions = (slots[None, :] - left_pad[:, None]).clamp(min=0)  # [B, T]
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions]  # [B, T, d_model]
        rope = self.rotary.tables_at(positions, x.dtype) if self.rotary is not None else None
        return x, rope, padded_causal_mask(start, T, start + T, left_pad)
