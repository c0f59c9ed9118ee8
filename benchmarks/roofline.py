"""The fastest any implementation could run a workload on this machine, from its own rates.

A forward pass must do a known amount of arithmetic (FLOPs) and read a known set of
weights (bytes). Neither can go faster than this machine's best measured rate for it, so

    floor(forward) = max(FLOPs / peak FLOP rate, bytes / peak read rate)

and a workload's floor is the sum over its forwards. A target ratio "ours >= r x the
reference" is then reachable only if r <= reference time / our floor: the benchmark
reports that ceiling next to every measured ratio. The work is counted from the
model's own routing (which experts each forward really used), the rates are measured
in the same process with the same threads: a float32 GEMM big enough to run at full
speed, and matrix-vector products over weights far larger than the caches (what
a decode step does with its weights).
"""

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sage_core import generate


@dataclass(frozen=True)
class MachineRates:
    flops_per_s: float  # float32 GEMM, best of several runs
    bytes_per_s: float  # weights streamed through matrix-vector products, best of several
    read_set_bytes: int = 256 << 20  # how many bytes of weights that read rate streamed

    def describe(self) -> str:
        return (
            f"machine rates, measured here: {self.flops_per_s / 1e9:.0f} GFLOP/s (float32 "
            f"GEMM 1024^3), {self.bytes_per_s / 1e9:.1f} GB/s (matrix-vector over "
            f"{self.read_set_bytes / (1 << 20):.0f} MiB)"
        )


def measure_rates(rounds: int = 5, read_set_bytes: int = 256 << 20) -> MachineRates:
    """Best-of-`rounds` GEMM FLOP rate and weight-streaming read rate, float32."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    F.linear(a, b)
    gemm = min(_seconds(lambda: F.linear(a, b)) for _ in range(rounds))
    return MachineRates(2 * 1024**3 / gemm, read_rate(read_set_bytes, rounds), read_set_bytes)


def read_rate(read_set_bytes: int, rounds: int = 5) -> float:
    """Best-of-`rounds` bytes/s of matrix-vector products over `read_set_bytes` of float32
    weights, read again and again. A model's weights are read forward after forward, so the
    rate at the model's own size is the one its floor needs: a model that fits in cache is
    read at cache speed, one far beyond it (256 MiB) at memory speed."""
    gen = torch.Generator().manual_seed(1)
    cols = 1024
    rows = max(1, read_set_bytes // (4 * cols))
    per = min(rows, 1024)
    weights = torch.randn(max(1, rows // per), per, cols, generator=gen)
    x = torch.randn(1, cols, generator=gen)

    def stream():
        for w in weights:
            F.linear(x, w)

    stream()
    return weights.numel() * weights.element_size() / min(_seconds(stream) for _ in range(rounds))


def model_bytes(model) -> int:
    """Bytes of every parameter of `model` (its working set when all experts are resident)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float

    def floor_s(self, rates: MachineRates) -> float:
        return max(self.flops / rates.flops_per_s, self.bytes / rates.bytes_per_s)


def forward_work(model, tokens: int, context: int, routing: dict, lm_head_rows: int) -> Work:
    """FLOPs and weight bytes of one forward of `tokens` new tokens after `context - tokens`
    cached ones; `routing` is {layer: expert indices (tokens, k)} of this forward."""
    cfg = model.config
    size = model.model.embed_tokens.weight.element_size()
    h, d = cfg.hidden_size, cfg.head_dim
    attn_params = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    # Scores and the weighted sum of values; a causal prefill sees on average half.
    attended = tokens * (context - tokens) + tokens * (tokens + 1) / 2
    attn_flops = 2 * 2 * cfg.num_attention_heads * d * attended
    kv_bytes = 2 * cfg.num_key_value_heads * d * context * size
    expert_params = 3 * cfg.moe_intermediate_size * h
    flops = bytes_ = 0.0
    for i in model.layer_indices:
        flops += 2 * tokens * attn_params + attn_flops
        bytes_ += attn_params * size + kv_bytes
        if i in routing:
            chosen = routing[i]
            flops += 2 * tokens * cfg.num_experts * h + 2 * chosen.numel() * expert_params
            distinct = torch.unique(chosen).numel()
            bytes_ += (cfg.num_experts * h + distinct * expert_params) * size
        else:
            dense_params = 3 * cfg.intermediate_size * h
            flops += 2 * tokens * dense_params
            bytes_ += dense_params * size
    if lm_head_rows:
        flops += 2 * lm_head_rows * cfg.vocab_size * h
        bytes_ += cfg.vocab_size * h * size
    return Work(flops, bytes_)


@torch.no_grad()
def prefill_floor(model, input_ids, rates: MachineRates) -> float:
    """Floor of one forward over `input_ids` with logits for every position."""
    with model.routing_trace() as trace:
        model(input_ids)
    routing = {layer: calls[0][0] for layer, calls in trace.items()}
    S = input_ids.shape[1]
    return forward_work(model, S, S, routing, lm_head_rows=S).floor_s(rates)


@torch.no_grad()
def decode_floor(model, prompt_ids, new_tokens: int, rates: MachineRates) -> float:
    """Floor of `generate(model, prompt_ids, new_tokens)`: the prompt's forward, then one
    forward per further token, each followed by one lm-head row (the least it needs)."""
    with model.routing_trace() as trace:
        generate(model, prompt_ids, new_tokens)
    forwards = len(next(iter(trace.values())))
    total, context = 0.0, 0
    for step in range(forwards):
        routing = {layer: calls[step][0] for layer, calls in trace.items()}
        tokens = prompt_ids.shape[1] if step == 0 else 1
        context += tokens
        total += forward_work(model, tokens, context, routing, lm_head_rows=1).floor_s(rates)
    return total


class _RecordMatmuls(TorchDispatchMode):
    """Records every matrix product (with its very tensors) that runs under it."""

    # _grouped_mm: one call for all of a layer's experts (sage_core's prefill); its kernel's
    # per-expert products run below the dispatcher, unseen, and are replayed with it.
    OPS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "_grouped_mm"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in self.OPS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


@torch.no_grad()
def matmul_replay_s(fn, rounds: int = 5) -> float:
    """Seconds that the matrix products `fn()` issues take alone, replayed back to back
    on the same tensors (median of `rounds`): what any implementation issuing the same
    products, with zero other work, would take on this machine."""
    with _RecordMatmuls() as recorder:
        fn()
    calls = recorder.calls

    def replay():
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    replay()
    return statistics.median(_seconds(replay) for _ in range(rounds))
