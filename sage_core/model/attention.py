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
    """Preallocated keys and values per layer (gpt-fast style).

    `length` positions are filled; the model advances it after each forward.
    """

    def __init__(self, layer_indices, batch, max_len, kv_heads, head_dim, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_indices}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_indices}
        self.batch = batch
        self.max_len = max_len
        self.length = 0


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

    def forward(self, x, cos, sin, kv=None, start: int = 0, mask=None):
        """x (B, S, H); cos/sin (B, S, head_dim); kv an optional (k_buf, v_buf) cache pair
        filled up to `start`; mask from `chunk_mask(start, S)`."""
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start : start + S] = k
            v_buf[:, :, start : start + S] = v
            k, v = k_buf[:, :, : start + S], v_buf[:, :, : start + S]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and S > 1,
            scale=self.scaling,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
