"""Grouped-query self-attention of the Qwen3-Omni thinker, with RMSNorm and a KV cache."""

import torch
import torch.nn.functional as F
from torch import nn

from sage_core.model.config import ThinkerTextConfig
from sage_core.model.rope import apply_rotary


class RMSNorm(nn.Module):
    """Statistics in float32; the weight multiplies after the cast back (as the reference)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class KVCache:
    """Preallocated keys and values of one layer (gpt-fast's KVCache).

    `update` is the one place that writes them. With an int `input_pos` (the eager path)
    it advances `length` and returns the filled prefix; with a tensor of positions (the
    static decode step) it writes in place and returns the whole cache, whose shapes never
    change, so a compiled step sees the same shapes at every token. The caller then masks
    the positions not yet written and keeps `length` itself (see `set_length`).
    """

    def __init__(self, batch, max_len, kv_heads, head_dim, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, input_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, kv_heads, S, head_dim) at positions input_pos .. input_pos + S - 1
        -> keys and values of every position so far, each (B, kv_heads, input_pos + S, head_dim);
        or, for input_pos a (S,) int64 tensor of positions, store them there
        -> the whole cache, each (B, kv_heads, max_len, head_dim).
        """
        if isinstance(input_pos, torch.Tensor):
            # index_copy_, not a slice: a slice bound by a tensor would need its value on
            # the host (a sync, and a new shape for the compiler at every token).
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
            return self.k_cache, self.v_cache
        end = input_pos + k.shape[2]
        self.k_cache[:, :, input_pos:end] = k
        self.v_cache[:, :, input_pos:end] = v
        self.length = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


class ModelKVCache(dict):
    """{layer index: KVCache} for the layers a model holds, all `batch` x `max_len`."""

    def __init__(self, layer_indices, batch, max_len, kv_heads, head_dim, device, dtype):
        super().__init__(
            (i, KVCache(batch, max_len, kv_heads, head_dim, device, dtype)) for i in layer_indices
        )
        self.batch = batch
        self.max_len = max_len

    @property
    def length(self) -> int:
        """Positions every layer holds. Each layer's update advances its own; after a
        forward that failed part way, the next one continues from what all layers stored."""
        return min(layer.length for layer in self.values())

    def set_length(self, length: int) -> None:
        """Record that every layer holds `length` positions, after static-step writes
        (which cannot advance `length` themselves without a host sync)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"length must be in [0, {self.max_len}], got {length}")
        for layer in self.values():
            layer.length = length


def static_decode_mask(input_pos: torch.Tensor, max_len: int) -> torch.Tensor:
    """(1, 1, 1, max_len) boolean mask for one query at position input_pos (a (1,) tensor):
    it sees the cache's positions 0 .. input_pos, not the unwritten (or stale) rest."""
    positions = torch.arange(max_len, device=input_pos.device)  # (max_len,)
    return (positions <= input_pos).view(1, 1, 1, max_len)


def chunk_mask(start: int, length: int, device) -> torch.Tensor | None:
    """Boolean attention mask for `length` new queries after `start` cached positions.

    Query i (absolute position start + i) sees keys 0 .. start + i. None when a plain
    causal mask (start == 0) or no mask at all (a single query) does the job.
    """
    if start == 0 or length == 1:
        return None
    return torch.ones(length, start + length, dtype=torch.bool, device=device).tril(start)


class Attention(nn.Module):
    def __init__(self, config: ThinkerTextConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = config.head_dim**-0.5
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)
        # Per head, before RoPE (Qwen3's QK-norm).
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, input_pos=0, mask=None):
        """x (B, S, H); cos/sin (B, S, head_dim); kv_cache holds the layer's first `input_pos`
        positions (this call appends S); mask from `chunk_mask(input_pos, S)`, or, for the
        static decode step (input_pos a (1,) tensor), from `static_decode_mask`."""
        B, S, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if kv_cache is not None:
            # (B, kv_heads, input_pos + S or max_len, head_dim)
            k, v = kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and S > 1,
            scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, heads, S, head_dim)
        y = y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)  # (B, S, heads*hd)
        return self.o_proj(y)

    def _qkv(self, x, cos, sin):
        """x (B, S, H) -> q (B, heads, S, hd), k and v (B, kv_heads, S, hd), after QK-norm
        and RoPE."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)  # (B, S, heads, head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # (B, S, kv_heads, hd)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # (B, S, kv_heads, hd)
        q = self.q_norm(q).transpose(1, 2)  # (B, heads, S, head_dim)
        k = self.k_norm(k).transpose(1, 2)  # (B, kv_heads, S, head_dim)
        v = v.transpose(1, 2)  # (B, kv_heads, S, head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        return q, k, v

    def forward_static(self, x, cos, sin, kv_cache: KVCache, input_pos, mask):
        """The decode step's attention: x (B, 1, H), input_pos a (1,) tensor, mask from
        `static_decode_mask` -> (B, 1, H).

        One query against the whole static cache, written as broadcast products and sums
        rather than SDPA: under torch.compile inductor fuses them with the masking and the
        softmax into a few loops, where SDPA would be an opaque kernel call per layer whose
        fixed cost, for a single query, exceeds its arithmetic. The softmax is taken in
        float32, as SDPA's CPU kernel does."""
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        k, v = kv_cache.update(input_pos, k, v)  # each (B, kv_heads, max_len, hd)
        group = self.num_heads // self.num_kv_heads
        # Query head h reads kv head h // group (SDPA's enable_gqa): (B, kv_heads, group, hd).
        q = q.reshape(B, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling  # (B, kv, g, L)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        y = torch.matmul(probs, v)  # (B, kv_heads, group, hd)
        return self.o_proj(y.reshape(B, 1, self.num_heads * self.head_dim))  # (B, 1, H)
