"""PRE-FIX CODE PATH of bug #1: a RoPE `inv_freq` buffer restored from a checkpoint as float64.

Kept only so notebook 01 and the regression tests can show the failure; nothing else in
sage_core imports it. The pre-fix rotary embedding is exactly the one of the report:

    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))   # persistent buffer
    freqs = torch.outer(t, inv_freq.to(x.device))                          # device only

`.to(x.device)` moves the buffer but keeps its dtype, so a float64 buffer makes
`torch.outer(float32, float64)` promote to float64; cos/sin, then q and k, follow, and
attention fails on `v`, which is still in the activation dtype.

Besides the pre-fix class, this module keeps the two halves of the report's "two-layer
defence" as separate classes (creation-only, use-only), the report's full fix (both), and,
for comparison, a block built on the project's fixed `sage_core.model.rope`.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save
from torch import nn

from sage_core.atomic import atomic_write_bytes
from sage_core.dtypes import dtype_name, parse_dtype
from sage_core.model.rope import MultimodalRotaryEmbedding, apply_rotary, rotate_half


@dataclass(frozen=True)
class BlockConfig:
    dim: int = 64
    n_heads: int = 4
    base: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # fixed block only; sums to head_dim // 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# -- rotary embeddings: the pre-fix one and its partial fixes -----------------------------


class PreFixRotaryEmbedding(nn.Module):
    """The report's code before the fix: `.float()` at creation, `.to(x.device)` at use."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: it goes into checkpoints

    def inv_freq_at_use(self, x: torch.Tensor) -> torch.Tensor:
        return self.inv_freq.to(x.device)

    def forward(self, x: torch.Tensor, seq_len: int):
        t = torch.arange(seq_len, device=x.device).float()
        freqs = torch.outer(t, self.inv_freq_at_use(x))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class CreationFixRotaryEmbedding(PreFixRotaryEmbedding):
    """Half of the report's fix: explicit float32 at creation, still `.to(x.device)` at use."""

    def __init__(self, dim: int, base: float):
        nn.Module.__init__(self)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq)


class UseFixRotaryEmbedding(PreFixRotaryEmbedding):
    """The other half: `.float()` at creation, explicit float32 at use."""

    def inv_freq_at_use(self, x: torch.Tensor) -> torch.Tensor:
        return self.inv_freq.to(device=x.device, dtype=torch.float32)


class ReportFixRotaryEmbedding(CreationFixRotaryEmbedding):
    """The report's full fix: explicit float32 at creation and at use."""

    def inv_freq_at_use(self, x: torch.Tensor) -> torch.Tensor:
        return self.inv_freq.to(device=x.device, dtype=torch.float32)


ROPE_VARIANTS = {
    "pre-fix": PreFixRotaryEmbedding,
    "creation-only fix": CreationFixRotaryEmbedding,
    "use-only fix": UseFixRotaryEmbedding,
    "report fix (both)": ReportFixRotaryEmbedding,
}
FIXED = "sage_core.model.rope"
VARIANTS = (*ROPE_VARIANTS, FIXED)


# -- attention blocks ----------------------------------------------------------------------


class _Projections(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        if config.dim % config.n_heads:
            raise ValueError(f"dim {config.dim} is not divisible by n_heads {config.n_heads}")
        self.config = config
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def _heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return proj(x).view(b, s, self.config.n_heads, self.config.head_dim).transpose(1, 2)

    def _attend(self, q, k, v) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.config.dim))


class PreFixAttentionBlock(_Projections):
    """q/k/v/o projections, pre-fix style RoPE on q and k, causal SDPA.

    Like the report's code, cos/sin are used as they come out of the rotary embedding
    (no cast to the activation dtype), so their dtype reaches q and k.
    """

    def __init__(self, config: BlockConfig, rope: str = "pre-fix"):
        super().__init__(config)
        if rope not in ROPE_VARIANTS:
            raise ValueError(
                f"unknown rope variant {rope!r}; expected one of {list(ROPE_VARIANTS)}"
            )
        self.rope = ROPE_VARIANTS[rope](config.head_dim, config.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.rope(x, x.shape[1])
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return self._attend(q, k, v)


class FixedAttentionBlock(_Projections):
    """The same block on the project's `sage_core.model.rope` (float32 table, cast to x.dtype)."""

    def __init__(self, config: BlockConfig):
        super().__init__(config)
        self.rope = MultimodalRotaryEmbedding(
            config.head_dim, config.base, config.mrope_section, interleaved=True
        )

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        q, k, v = (self._heads(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.rope(x, position_ids)
        q, k = apply_rotary(q, k, cos, sin)
        return self._attend(q, k, v)


def make_block(
    variant: str, config: BlockConfig = BlockConfig(), seed: int = 0, dtype="float32"
) -> nn.Module:
    """A block with seeded weights; `variant` is a key of ROPE_VARIANTS or FIXED.

    Only the parameters are cast to `dtype`: the RoPE buffer is whatever the variant's
    own code creates (`module.to(dtype)` would cast it too, which is another story).
    """
    torch.manual_seed(seed)
    block = (
        FixedAttentionBlock(config) if variant == FIXED else PreFixAttentionBlock(config, variant)
    )
    for param in block.parameters():
        param.data = param.data.to(parse_dtype(dtype))
    return block


def make_input(
    config: BlockConfig = BlockConfig(), batch: int = 2, seq: int = 8, dtype="float32", seed=0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, config.dim, generator=generator)
    return x.to(parse_dtype(dtype))


# -- checkpoints and the ways of loading them ----------------------------------------------


def export_inv_freq(config: BlockConfig, dtype=torch.float64) -> torch.Tensor:
    """The RoPE table as an exporter that computes it in numpy writes it: float64 by default."""
    dim = config.head_dim
    table = 1.0 / config.base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return torch.from_numpy(table).to(parse_dtype(dtype))


def write_checkpoint(
    block: nn.Module, path: str | os.PathLike, inv_freq_dtype=torch.float64
) -> Path:
    """Save `block`'s weights with safetensors, `rope.inv_freq` in `inv_freq_dtype`.

    The weights keep their dtype; only the table is (re)exported, as a float64 numpy
    computation would write it. Atomic: temp file, fsync, rename.
    """
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in block.state_dict().items()}
    state["rope.inv_freq"] = export_inv_freq(block.config, inv_freq_dtype)
    return atomic_write_bytes(path, save(state, metadata={"format": "pt"}))


def _copy(block: nn.Module, file: Path) -> None:
    block.load_state_dict(load_file(file))


def _safetensors_load_model(block: nn.Module, file: Path) -> None:
    load_model(block, file)


def _assign(block: nn.Module, file: Path) -> None:
    block.load_state_dict(load_file(file), assign=True)


def _double_then_params_back(block: nn.Module, file: Path) -> None:
    # A precision check in float64, then "back" for the parameters only: buffers are
    # not parameters, so inv_freq stays float64.
    block.load_state_dict(load_file(file))
    _double_then_params_back_in_place(block)


def _double_then_params_back_in_place(block: nn.Module) -> None:
    dtype = next(block.parameters()).dtype
    block.double()
    for param in block.parameters():
        param.data = param.data.to(dtype)


LOADING_PATHS: dict[str, Callable[[nn.Module, Path], None]] = {
    "load_state_dict(sd)": _copy,
    "safetensors load_model": _safetensors_load_model,
    "load_state_dict(sd, assign=True)": _assign,
    "meta device + assign=True": _assign,  # the low-memory loader: build on meta, then assign
    ".double(), params back": _double_then_params_back,
}


def load_block(
    variant: str,
    file: str | os.PathLike,
    how: str,
    config: BlockConfig = BlockConfig(),
    dtype="float32",
) -> nn.Module:
    """Build a block of `variant` and load `file` into it the way named by `how`.

    The fixed block does not persist its table (it is derived from head_dim and theta),
    so the file's `rope.inv_freq` is not one of its keys. To test it under the same
    conditions, the loading paths that pollute a persistent buffer put the file's table
    into its buffer as well (the worst case); the copying paths drop it. Parameters are
    created in `dtype`; a copying load keeps that dtype, an assigning one takes the file's.
    """
    if how not in LOADING_PATHS:
        raise ValueError(f"unknown loading path {how!r}; expected one of {list(LOADING_PATHS)}")
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    if how.startswith("meta"):
        with torch.device("meta"):
            block = make_block(variant, config, dtype=dtype)
    else:
        block = make_block(variant, config, dtype=dtype)
    if variant != FIXED:
        LOADING_PATHS[how](block, file)
        return block
    table = load_file(file)["rope.inv_freq"]
    weights = {k: v for k, v in load_file(file).items() if k != "rope.inv_freq"}
    if how in ("load_state_dict(sd, assign=True)", "meta device + assign=True"):
        block.load_state_dict(weights, assign=True)
        block.rope.inv_freq = table
    elif how == ".double(), params back":
        block.load_state_dict(weights)
        _double_then_params_back_in_place(block)
    else:
        block.load_state_dict(weights)
    return block


# -- running and evaluating ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    variant: str
    how: str
    buffer_dtype: str  # dtype of rope.inv_freq after loading
    cos_dtype: str  # dtype of the cos table the rotary embedding returns
    output_dtype: str | None  # None when the forward raised
    error: str | None  # "RuntimeError: ..." when the forward raised

    @property
    def survived(self) -> bool:
        return self.error is None


def rope_tables(block: nn.Module, x: torch.Tensor):
    """(cos, sin) as the block's rotary embedding computes them for `x`."""
    if isinstance(block, FixedAttentionBlock):
        positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return block.rope(x, positions)
    return block.rope(x, x.shape[1])


def run_block(block: nn.Module, x: torch.Tensor, variant: str = "", how: str = "") -> Outcome:
    """Run the forward once and record what happened, the exception included."""
    cos, _ = rope_tables(block, x)
    with torch.no_grad():
        try:
            out = block(x)
        except RuntimeError as exc:
            return Outcome(
                variant, how, dtype_name(block.rope.inv_freq.dtype), dtype_name(cos.dtype),
                None, f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
    return Outcome(
        variant, how, dtype_name(block.rope.inv_freq.dtype), dtype_name(cos.dtype),
        dtype_name(out.dtype), None,
    )  # fmt: skip


def evaluate_defence(
    file: str | os.PathLike, x: torch.Tensor, variants=VARIANTS, config=BlockConfig()
) -> list[Outcome]:
    """Every variant on every loading path of `file`, run on `x` (model dtype = x.dtype)."""
    return [
        run_block(load_block(variant, file, how, config, dtype=x.dtype), x, variant, how)
        for variant in variants
        for how in LOADING_PATHS
    ]


def defence_table(outcomes: list[Outcome]) -> str:
    """variant x loading path -> "ok" or "FAILS", as a fixed-width text table."""
    variants = list(dict.fromkeys(o.variant for o in outcomes))
    paths = list(dict.fromkeys(o.how for o in outcomes))
    cell = {(o.variant, o.how): ("ok" if o.survived else "FAILS") for o in outcomes}
    rows = [("variant \\ loading path", *paths)]
    rows += [(v, *(cell[(v, p)] for p in paths)) for v in variants]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


_C10_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.bfloat16: "c10::BFloat16",
    torch.float16: "c10::Half",
}


def sdpa_dtype_error(qk_dtype: torch.dtype, v_dtype: torch.dtype) -> str:
    """The exact text torch's SDPA raises when q and k are `qk_dtype` and v is `v_dtype`."""
    qk, v = _C10_NAMES[qk_dtype], _C10_NAMES[v_dtype]
    return (
        "RuntimeError: Expected query, key, and value to have the same dtype, but got "
        f"query.dtype: {qk} key.dtype: {qk} and value.dtype: {v} instead."
    )


def inv_freq_under_default_dtype(variant: str, default_dtype, config=BlockConfig()):
    """The table a variant creates while `torch.set_default_dtype(default_dtype)` is active."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(parse_dtype(default_dtype))
    try:
        return ROPE_VARIANTS[variant](config.head_dim, config.base).inv_freq
    finally:
        torch.set_default_dtype(previous)
