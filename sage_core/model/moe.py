"""Mixture of experts of the Qwen3-Omni thinker: router, expert providers, selection hook.

Routing is a hook: the block computes per-token router logits and hands them, with
the layer index and the hidden states, to an `ExpertSelector` that returns which
experts each token uses and with what weights. `RouterTopK` is the model's own
router; the trust-augmented selector plugs in at the same place.

Experts come from a provider: any module with `.num_experts` and
`.expert(e) -> (gate_up [2I, H], down [H, I])`. `ResidentExperts` holds them all
as two stacked parameters (the fused checkpoint layout); the checkpoint loader may
substitute an on-demand provider backed by an LRU cache.
"""

import threading
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sage_core.model.config import ThinkerTextConfig

# Decode with resident experts may gather each token's k experts' weights and run two
# batched matmuls with no host sync (gpt-fast's choice on GPU). Measured on CPU (mid
# config: 128 experts, top-8, hidden 512, intermediate 192; 1 to 8 tokens) the grouped
# path was faster in float32 and bfloat16, so the gather path is used on CUDA only.
GATHER_DEVICES = ("cuda",)
GATHER_MAX_TOKENS = 4

# Several tokens with resident experts (a prefill), without autograd: both expert products
# of a layer go through one torch._grouped_mm call each (`grouped_mm_expert_mix`), which
# walks the experts in C++ where `grouped_expert_mix` slices, transposes and launches them
# from Python (`python -m benchmarks` times the two side by side). Only on CPU, where it
# was measured (faster in float32, bfloat16 and float16, same outputs as the loop); its
# CUDA kernel wants bfloat16 on recent GPUs and is unmeasured here.
# `grouped_expert_mix` stays the path for autograd (torch._grouped_mm has no CPU backward),
# for on-demand expert providers, and for shapes the kernel rejects.
GROUPED_MM_DEVICES = ("cpu",)
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertSelector(Protocol):
    def __call__(
        self, router_logits: torch.Tensor, layer_idx: int, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits (T, E), hidden_states (T, H) -> (indices (T, k) int64,
        weights (T, k) in hidden_states.dtype)."""
        ...


class RouterTopK:
    """The model's own routing: softmax in float32, top-k, renormalise, cast back."""

    def __init__(self, top_k: int, norm_topk_prob: bool):
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def __call__(self, router_logits, layer_idx, hidden_states):
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights.to(hidden_states.dtype)

    def __repr__(self):
        return f"RouterTopK(top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob})"


class ResidentExperts(nn.Module):
    """All experts of one layer in memory, stacked as in the fused checkpoint layout."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[e], self.down_proj[e]


class DenseMLP(nn.Module):
    """The dense feed-forward of `mlp_only_layers` (transformers' ThinkerTextMLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_expert_mix(x, indices, weights, experts) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{indices[t, j]}(x[t]), grouped by expert.

    The (token, slot) pairs are sorted by expert; each used expert runs one gate_up and
    one down matmul over all its tokens, and one index_add_ scatters the results back.
    Experts are requested one at a time and released before the next is asked for.
    """
    # Experts run one after another, each GEMM over all torch threads. Whole experts on
    # single-threaded worker threads speed up the products alone, but slow them down amid
    # a model's other ops: OpenMP's threads keep spinning after every multi-threaded op and
    # take a core from the workers (`python -m benchmarks.expert_threads`, RESULTS.md).
    T, k = indices.shape
    flat = indices.reshape(-1)  # (T*k,) expert of each (token, slot)
    order = flat.argsort(stable=True)  # (T*k,) slots grouped by expert
    token_of = order // k  # (T*k,) token of each sorted slot
    counts = torch.bincount(flat, minlength=experts.num_experts)  # (E,)
    used = counts.nonzero().squeeze(1)
    plan = zip(*torch.stack([used, counts[used]]).tolist())  # the one host sync
    ws = weights.reshape(-1).index_select(0, order)[:, None]  # (T*k, 1)
    if torch.is_grad_enabled():  # autograd cannot follow matmuls into a buffer (out=)
        xs = x.index_select(0, token_of)  # (T*k, H); index_select beats x[token_of] on CPU
        rows = [_expert_ffn(xs[s : s + n], *experts.expert(e)) for e, s, n in _spans(plan)]
        ys = torch.cat(rows) * ws
    else:
        # Each expert's down matmul writes its rows of one buffer: no per-expert outputs
        # to concatenate (a measurable share of a prefill). On CPU both buffers are reused
        # from call to call (see _WORKSPACE).
        xs = torch.index_select(x, 0, token_of, out=_buffer("xs", T * k, x))  # (T*k, H)
        ys = _buffer("ys", T * k, x)  # (T*k, H)
        for e, start, n in _spans(plan):
            gate_up, down = experts.expert(e)
            _expert_ffn(xs[start : start + n], gate_up, down, out=ys[start : start + n])
            del gate_up, down  # a bounded on-demand cache may evict (and reuse) it now
        ys.mul_(ws)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def grouped_mm_usable(x: torch.Tensor, experts) -> bool:
    """Whether `grouped_mm_expert_mix` can run this call: torch._grouped_mm present, no
    autograd, resident experts in x's dtype on a device of GROUPED_MM_DEVICES, and every
    operand stride a multiple of 16 bytes (the kernel refuses others)."""
    if (
        not hasattr(torch, "_grouped_mm")
        or torch.is_grad_enabled()
        or not isinstance(experts, ResidentExperts)
        or x.device.type not in GROUPED_MM_DEVICES
        or x.dtype not in GROUPED_MM_DTYPES
    ):
        return False
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if gate_up.dtype != x.dtype or down.dtype != x.dtype or gate_up.device != x.device:
        return False
    # The rows of xs (H), of the gated activations (I) and both stacks' strides.
    strides = (x.shape[1], down.shape[2], *gate_up.stride(), *down.stride())
    return all(s * x.element_size() % 16 == 0 for s in strides if s != 1)


def grouped_mm_expert_mix(x, indices, weights, experts: ResidentExperts) -> torch.Tensor:
    """`grouped_expert_mix` with each of the two expert products issued as one
    torch._grouped_mm over the whole stack: the same sorted rows, the same per-expert
    products and the same scatter back, no host sync. The stacks, transposed, are the
    (experts, in, out) operands it takes; on CPU they are stored that way (contiguous), so
    nothing is copied. Check `grouped_mm_usable` first."""
    T, k = indices.shape
    flat = indices.reshape(-1)  # (T*k,) expert of each (token, slot)
    # Stable: within an expert, rows stay in token order, as in grouped_expert_mix.
    order = flat.argsort(stable=True)  # (T*k,) slots grouped by expert
    token_of = order // k  # (T*k,) token of each sorted slot
    # Group g is rows [ends[g-1], ends[g]): expert g's rows, empty for an unused expert.
    # bincount is safe: the block checked the indices' range before any path runs.
    ends = torch.bincount(flat, minlength=experts.num_experts).cumsum(0, dtype=torch.int32)
    ws = weights.reshape(-1).index_select(0, order)[:, None]  # (T*k, 1)
    if x.device.type == "cpu":  # reused, as in grouped_expert_mix (see _WORKSPACE)
        xs = torch.index_select(x, 0, token_of, out=_buffer("xs", T * k, x))  # (T*k, H)
    else:
        xs = x.index_select(0, token_of)  # (T*k, H)
    # (T*k, H) x per-row expert's (H, 2I) -> (T*k, 2I)
    h = torch._grouped_mm(xs, experts.gate_up_proj.transpose(1, 2), offs=ends)
    gate, up = h.chunk(2, dim=-1)  # each (T*k, I)
    # (T*k, I) x per-row expert's (I, H) -> (T*k, H)
    ys = torch._grouped_mm(F.silu(gate).mul_(up), experts.down_proj.transpose(1, 2), offs=ends)
    ys.mul_(ws)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


class _Workspace(threading.local):
    """Per-thread CPU buffers for the sorted tokens and their expert outputs, kept between
    calls. Fresh multi-MiB tensors come from the OS page by page, and a prefill spent a
    large share of its time in those page faults; with these buffers, none. (CUDA's
    caching allocator already reuses memory.) Held: the largest T*k x H seen, twice;
    `release_workspace()` frees them."""

    def __init__(self):
        self.buffers: dict = {}


_WORKSPACE = _Workspace()


def _buffer(name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, like.shape[1]) tensor to overwrite: reused on CPU, fresh elsewhere."""
    cols = like.shape[1]
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    key = (name, like.dtype)
    buffer = _WORKSPACE.buffers.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        # A normal tensor even under inference_mode: an inference tensor could not be
        # written in place by a later call under no_grad.
        with torch.inference_mode(False):
            buffer = _WORKSPACE.buffers[key] = like.new_empty(rows * cols)
    return buffer[: rows * cols].view(rows, cols)  # (rows, cols)


def release_workspace() -> None:
    """Free this thread's reusable expert buffers (they are rebuilt on the next call)."""
    _WORKSPACE.buffers.clear()


def _spans(plan):
    """(expert, first row, rows) over the expert-sorted rows, from (expert, count) pairs."""
    start = 0
    for e, n in plan:
        yield e, start, n
        start += n


def _expert_ffn(x, gate_up, down, out=None):
    """One expert on rows x: down(silu(gate(x)) * up(x)); into `out` (no autograd) if given."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # each (rows, I)
    if out is None:
        return F.linear(F.silu(gate) * up, down)
    return torch.mm(F.silu(gate).mul_(up), down.t(), out=out)


def single_token_expert_mix(x, indices, weights, experts) -> torch.Tensor:
    """The same sum for one token (decode) without autograd: its k experts in turn, each
    writing one row of a (k, H) buffer, then one (1, k) x (k, H) product with the weights.
    Sorting and scattering one token's slots is pure overhead for a decode step."""
    ys = x.new_empty(indices.shape[1], x.shape[1])  # (k, H)
    chosen = indices[0].tolist()  # the one host sync
    for j, e in enumerate(chosen):
        gate_up, down = experts.expert(e)
        _expert_ffn(x, gate_up, down, out=ys[j : j + 1])
        del gate_up, down  # a bounded on-demand cache may evict (and reuse) it now
    return torch.mm(weights, ys)  # (1, k) x (k, H) -> (1, H)


def gathered_expert_mix(x, indices, weights, experts: ResidentExperts) -> torch.Tensor:
    """The same sum for a few tokens: gather each token's k experts' weights (gpt-fast)."""
    gate_up = experts.gate_up_proj[indices]  # (T, k, 2I, H)
    down = experts.down_proj[indices]  # (T, k, H, I)
    gate, up = torch.einsum("th,tkih->tki", x, gate_up).chunk(2, dim=-1)  # each (T, k, I)
    y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, down)  # (T, k, H)
    return (y * weights[..., None]).sum(dim=1)  # (T, H)


# Rows of an expert's weight matrix summed together first in the compiled decode step's
# products (then the blocks are summed). Inductor then reads a block of rows, each row
# contiguous in the stored (transposed) stacks, whole before the next: every expert's
# weights stream through memory once. One reduction over all rows walked them a column
# chunk at a time, slower than the eager path's BLAS call once an expert outgrows the
# cache (the mid config); 32 was the fastest of 16/32/64/128 there.
REDUCE_BLOCK = 32


def _blocked_matvec(x, w):
    """x (T, k, K) . w (T, k, K, N) -> (T, k, N), the sum over K taken in blocks."""
    T, k, K, N = w.shape
    block = REDUCE_BLOCK if K % REDUCE_BLOCK == 0 else K
    products = w.reshape(T, k, K // block, block, N) * x.reshape(T, k, K // block, block, 1)
    return products.sum(-2).sum(-2)  # (T, k, K / block, N) -> (T, k, N)


def gathered_expert_mix_reduce(x, indices, weights, experts: ResidentExperts) -> torch.Tensor:
    """gathered_expert_mix written as broadcast products and sums, for the compiled decode
    step: inductor fuses the gather into the reduction loops (each chosen expert's weights
    are read in place, never copied out), where an einsum lowers to a batched product over
    gathered copies. Eagerly it materialises the products (T, k, H, 2I): for a step of a
    few tokens only."""
    T, k = indices.shape
    gate_up = experts.gate_up_proj.transpose(1, 2)[indices]  # (T, k, H, 2I)
    down = experts.down_proj.transpose(1, 2)[indices]  # (T, k, I, H)
    h = _blocked_matvec(x[:, None, :].expand(T, k, x.shape[-1]), gate_up)  # (T, k, 2I)
    gate, up = h.chunk(2, dim=-1)  # each (T, k, I)
    y = _blocked_matvec(F.silu(gate) * up, down)  # (T, k, H)
    return (y * weights[..., None]).sum(dim=1)  # (T, H)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ThinkerTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = ResidentExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )
        # Plain attributes, not submodules: a selector is behaviour, never a weight.
        object.__setattr__(
            self, "selector", RouterTopK(config.num_experts_per_tok, config.norm_topk_prob)
        )
        object.__setattr__(self, "trace", None)  # a list while routing_trace() records

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, H) -> (output (B, S, H), router_logits (B*S, E))."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T = B*S, H)
        router_logits = F.linear(x, self.gate.weight)  # (T, E)
        indices, weights = self.selector(router_logits, self.layer_idx, x)  # each (T, k)
        self._check_choice(indices, weights, x)
        if self.trace is not None:
            self.trace.append((indices.detach().cpu(), weights.detach().cpu()))
        if (
            isinstance(self.experts, ResidentExperts)
            and x.device.type in GATHER_DEVICES
            and x.shape[0] <= GATHER_MAX_TOKENS
        ):
            out = gathered_expert_mix(x, indices, weights, self.experts)
        elif x.shape[0] == 1 and not torch.is_grad_enabled():
            out = single_token_expert_mix(x, indices, weights, self.experts)
        elif grouped_mm_usable(x, self.experts):
            out = grouped_mm_expert_mix(x, indices, weights, self.experts)
        else:
            out = grouped_expert_mix(x, indices, weights, self.experts)
        return out.reshape(shape), router_logits  # (B, S, H), (T, E)

    def forward_static(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step's MoE, with no host sync (torch.compile traces it whole):
        x (B, 1, H) -> (output (B, 1, H), `bad`: a 0-d bool, True if the selector chose
        an expert outside [0, E)).

        Each token gathers its k experts' weights (gpt-fast's ConditionalFeedForward): the
        same shapes at every token, where the eager path's loop over chosen experts needs
        their indices on the host. Out-of-range indices are clamped so the gather stays in
        bounds, and reported through `bad` for the caller to raise on (the eager forward
        raises at once). Resident experts only; the routing trace is not recorded."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T = B, H)
        router_logits = F.linear(x, self.gate.weight)  # (T, E)
        indices, weights = self.selector(router_logits, self.layer_idx, x)  # each (T, k)
        self._check_choice_shapes(indices, weights, x)  # static: costs nothing when compiled
        bad = ((indices < 0) | (indices >= self.num_experts)).any()  # (), on the device
        indices = indices.clamp(0, self.num_experts - 1)
        out = gathered_expert_mix_reduce(x, indices, weights, self.experts)  # (T, H)
        return out.reshape(shape), bad

    def _check_choice(self, indices, weights, x):
        """The one check of a selector's choice, before any of the expert paths runs
        (the gather path would silently index expert E-1 for -1)."""
        self._check_choice_shapes(indices, weights, x)
        if indices.numel() == 0:
            return
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one host sync
        if lo < 0 or hi >= self.num_experts:
            raise ValueError(self.out_of_range_message(lo if lo < 0 else hi))

    def out_of_range_message(self, expert=None) -> str:
        chose = "an expert" if expert is None else f"expert {expert}"
        return (
            f"selector for layer {self.layer_idx} chose {chose}, "
            f"outside the valid range [0, {self.num_experts})"
        )

    def _check_choice_shapes(self, indices, weights, x):
        """Shapes and dtypes of a selector's choice: metadata only, no host sync."""
        T = x.shape[0]
        if indices.dim() != 2 or indices.shape[0] != T or indices.dtype != torch.int64:
            raise ValueError(
                f"selector for layer {self.layer_idx} returned expert indices of shape "
                f"{tuple(indices.shape)} and dtype {indices.dtype}; expected ({T}, k) int64"
            )
        if weights.shape != indices.shape or weights.dtype != x.dtype:
            raise ValueError(
                f"selector for layer {self.layer_idx} returned weights of shape "
                f"{tuple(weights.shape)} and dtype {weights.dtype}; expected "
                f"{tuple(indices.shape)} in the hidden states' dtype {x.dtype}"
            )


def load_balancing_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch / Qwen-MoE auxiliary loss over a sequence of (T, E) router logits, one per layer.

    num_experts * sum_e (fraction of top-k slots given to e) * (mean router prob of e),
    with tokens of all layers pooled (transformers' load_balancing_loss_func without a
    mask). Probabilities are taken in float32.
    """
    if not router_logits:
        raise ValueError("router_logits is empty: no sparse layer produced logits")
    logits = torch.cat([r.to(torch.float32) for r in router_logits])
    if logits.dim() != 2 or logits.shape[1] != num_experts:
        raise ValueError(
            f"router_logits must be (T, num_experts={num_experts}) tensors, "
            f"got {tuple(logits.shape)} after concatenation"
        )
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    chosen = chosen.reshape(-1)  # (T*k,)
    slot_share = torch.bincount(chosen, minlength=num_experts) / logits.shape[0]  # (E,)
    return num_experts * (slot_share * probs.mean(0)).sum()
