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

    `update` writes each new chunk and advances `length`, the positions filled.
    """

    def __init__(self, batch, max_len, kv_heads, head_dim, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, input_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, kv_heads, S, head_dim) at positions input_pos .. input_pos + S - 1
        -> keys and values of every position so far, each (B, kv_heads, input_pos + S, head_dim).
        """
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

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, input_pos: int = 0, mask=None):
        """x (B, S, H); cos/sin (B, S, head_dim); kv_cache holds the layer's first `input_pos`
        positions (this call appends S); mask from `chunk_mask(input_pos, S)`."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)  # (B, S, heads, head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # (B, S, kv_heads, hd)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # (B, S, kv_heads, hd)
        q = self.q_norm(q).transpose(1, 2)  # (B, heads, S, head_dim)
        k = self.k_norm(k).transpose(1, 2)  # (B, kv_heads, S, head_dim)
        v = v.transpose(1, 2)  # (B, kv_heads, S, head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(input_pos, k, v)  # (B, kv_heads, input_pos + S, head_dim)
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
