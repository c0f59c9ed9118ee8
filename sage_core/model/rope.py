"""Multimodal rotary position embedding (M-RoPE) of the Qwen3-Omni thinker.

The inverse frequencies are float32 when created *and* when used: a checkpoint or a
`load_state_dict(..., assign=True)` can replace the buffer with a float64 tensor
(bug #1 of the dtype report), and only the cast at use makes that harmless.
"""

from collections.abc import Sequence

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """`1 / theta ** (arange(0, head_dim, 2) / head_dim)`, always float32."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":
        # No values to compute on meta, and arange there runs torch's Python reference
        # kernels, whose import (sympy included) would dominate a loader's RSS.
        return torch.empty(head_dim // 2, dtype=torch.float32, device=device)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponent)


def interleave_mrope(freqs: torch.Tensor, mrope_section: Sequence[int]) -> torch.Tensor:
    """Merge per-axis frequencies (3, ..., head_dim // 2) into one (..., head_dim // 2) table.

    Qwen3-Omni's interleaved layout: start from the temporal row, take indices
    `1::3` (up to 3 * mrope_section[1]) from the height row and `2::3`
    (up to 3 * mrope_section[2]) from the width row.
    """
    merged = freqs[0].clone()
    for axis, offset in ((1, 1), (2, 2)):
        idx = slice(offset, 3 * mrope_section[axis], 3)
        merged[..., idx] = freqs[axis, ..., idx]
    return merged


class MultimodalRotaryEmbedding(nn.Module):
    """cos/sin tables for position ids of shape (B, S) or (3, B, S).

    Returns `(cos, sin)` of shape (B, S, head_dim), computed in float32 and cast to
    the dtype of `x` (the activations) at the very end.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 1_000_000.0,
        mrope_section: Sequence[int] = (24, 20, 20),
        interleaved: bool = True,
    ):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(
                f"mrope_section {list(mrope_section)} must sum to head_dim // 2 = {head_dim // 2}"
            )
        if not interleaved:
            raise ValueError("only the interleaved M-RoPE layout of Qwen3-Omni is supported")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.mrope_section = tuple(int(s) for s in mrope_section)
        # Not persistent: the table is a function of (head_dim, theta), never a weight.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, self.theta), persistent=False)

    def reset_buffers(self, device=None) -> None:
        """Recompute `inv_freq` (e.g. after building the module on the meta device)."""
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, device=device)

    def _apply(self, fn, recurse=True):
        # A parent's `.to(bfloat16)` would round the table with the weights, and casting
        # back at use cannot undo rounding: when a cast touched it, rebuild it in float32.
        before = self.inv_freq.dtype
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != before:
            self.reset_buffers(device=self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # (3, B, S)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(
                f"position_ids must be (B, S) or (3, B, S), got {tuple(position_ids.shape)}"
            )
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        freqs = position_ids.to(device=x.device, dtype=torch.float32)[..., None] * inv_freq
        freqs = interleave_mrope(freqs, self.mrope_section)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k of shape (B, heads, S, head_dim) with tables of shape (B, S, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, head_dim): every head
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
