"""The static-cache decode loop and its torch.compile: `generate(..., compile=True)`.

gpt-fast's recipe (pytorch-labs/gpt-fast, mixtral-moe/): the prompt runs eagerly (its
length varies), then every new token is one call of `Qwen3OmniThinker.decode_step`,
whose shapes never change: the KV cache is allocated once at a bucketed length and read
whole under a mask, the token's position is a tensor, and each MoE layer gathers its k
experts' weights. So `torch.compile` traces the step once into one graph (fullgraph,
no host sync) and reuses it for every token and every generation of the same batch size
and cache bucket. A greedy token is picked inside that graph too (`_greedy_step`: read
the token, step, argmax, write it, advance the position), so per token the loop makes one
call and nothing else; a sampler gets the step's logits and draws eagerly. On CPU the step is compiled by inductor's C++ backend; on CUDA with
mode="reduce-overhead", i.e. replayed as a CUDA graph (not measured: no GPU here).

What cannot be traced decodes eagerly, with a warning that says why: experts loaded on
demand (`max_resident_experts`: no stacks to gather from), a selector that does not
declare itself traceable (`compile_traceable = True`; the model's own RouterTopK does),
an active `routing_trace()`.
"""

import contextlib
import functools
import importlib.util
import shutil
import warnings

import torch

from sage_core.model.attention import ModelKVCache
from sage_core.model.moe import ResidentExperts, RouterTopK

# Cache lengths are rounded up to a multiple of this, so generations of different
# lengths share one compiled graph (the cache's length is part of its shape).
CACHE_BUCKET = 256


class CompileUnavailable(RuntimeError):
    """torch.compile cannot build the decode step on this machine (named: what is missing)."""


def static_cache_len(needed: int, max_position_embeddings: int) -> int:
    """`needed` positions rounded up to CACHE_BUCKET, but not past the model's context
    (unless `needed` itself is longer: the model still runs there, as eager generate does)."""
    bucketed = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
    return max(needed, min(bucketed, max_position_embeddings))


def compile_options(device: torch.device) -> dict:
    """torch.compile's arguments for the decode step on `device`."""
    # One graph, no breaks (a break would be a host sync per token), static shapes. On
    # CUDA, "reduce-overhead" replays the step as a CUDA graph: one launch per token
    # instead of one per kernel. CPU has no graphs to replay: inductor's defaults.
    options = dict(backend="inductor", fullgraph=True, dynamic=False)
    if device.type == "cuda":
        options["mode"] = "reduce-overhead"
    else:
        options["options"] = {
            # The graph's driver in C++, not a Python function of several hundred lines
            # (argument checks, buffer allocations, one call per kernel) run every token.
            "cpp_wrapper": True,
            # A single token's (1, K) x (K, N) products become fused multiply-and-sum loops
            # rather than calls into the BLAS library, whose fixed cost per call exceeds
            # the arithmetic of a vector-matrix product at these sizes (inductor's own pass,
            # off by default; it leaves products with a dimension over 2048 to the library).
            "post_grad_fusion_options": {"decompose_mm_pass": {}},
        }
    return options


def _which(name: str) -> str | None:
    return shutil.which(name)


def check_compiler(device: torch.device) -> None:
    """Raise CompileUnavailable now if inductor could not build a step for `device`
    (rather than in the middle of the first token, with a long compiler traceback)."""
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        cxx = inductor_config.cpp.cxx
        names = [n for n in (cxx if isinstance(cxx, list | tuple) else (cxx,)) if n]
        if not any(_which(n) for n in names):
            raise CompileUnavailable(
                "generate(compile=True) needs a C++ compiler for torch.compile's inductor CPU "
                f"backend, and none of {names} (torch._inductor.config.cpp.cxx) is on PATH; "
                "install one (e.g. `apt-get install g++`) or use compile=False"
            )
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise CompileUnavailable(
                "generate(compile=True) on CUDA needs triton for torch.compile's inductor "
                "backend, and it is not installed; `pip install triton` or use compile=False"
            )
    else:
        raise CompileUnavailable(
            f"generate(compile=True) supports cpu and cuda devices, not {device.type!r}; "
            "use compile=False"
        )


def eager_reason(model) -> str | None:
    """Why the compiled step cannot run this model as it is now; None if it can."""
    for i, block in model.sparse_blocks().items():
        if not isinstance(block.experts, ResidentExperts):
            return (
                f"layer {i}'s experts are loaded on demand ({type(block.experts).__name__}, "
                "max_resident_experts): the compiled step gathers from resident expert stacks"
            )
        selector = block.selector
        if not (type(selector) is RouterTopK or getattr(selector, "compile_traceable", False)):
            return (
                f"layer {i}'s selector {type(selector).__name__} does not declare "
                "compile_traceable = True (it may sync with the host or keep Python state)"
            )
        if block.trace is not None:
            return "a routing_trace() is recording (it copies every choice to the host)"
    return None


def _step(model, token, input_pos, cache):
    return model.decode_step(token, input_pos, cache)


def _greedy_step(model, ids, input_pos, cache, bad):
    """A whole greedy token in one call, so nothing of it runs outside the compiled graph:
    read the token at `input_pos` from `ids` (B, max_len), run the step, write its argmax
    at input_pos + 1, fold the step's out-of-range flag into `bad` and advance input_pos.
    Every argument keeps its shape from token to token; the three mutated ones are
    updated in place."""
    token = ids.index_select(1, input_pos)  # (B, 1)
    logits, step_bad = model.decode_step(token, input_pos, cache)  # (B, V), ()
    ids.index_copy_(1, input_pos + 1, logits.argmax(dim=-1, keepdim=True))
    bad.logical_or_(step_bad)
    input_pos.add_(1)


@functools.cache
def compiled_step(device_type: str, greedy: bool = False):
    """The compiled decode step for a device type: one wrapper per process, so every
    model of the same shapes shares its graphs (and inductor's on-disk cache, by default
    under /tmp/torchinductor_$USER, makes a second process compile in seconds).
    greedy=True: `_greedy_step`, the token picked inside the graph; otherwise `_step`,
    which returns the logits for a sampler (or any `next_token`) run eagerly."""
    return torch.compile(
        _greedy_step if greedy else _step, **compile_options(torch.device(device_type))
    )


@torch.no_grad()
def generate_static(model, input_ids, max_new_tokens, next_token, compile: bool):
    """Prefill eagerly, then `max_new_tokens - 1` static decode steps (compiled or not).

    `next_token(logits (B, V)) -> (B,)` picks each token; None: greedy, picked inside the
    step (`_greedy_step`). -> LongTensor (B, S + new).
    """
    B, S = input_ids.shape
    device = input_ids.device
    max_len = static_cache_len(S + max_new_tokens, model.config.max_position_embeddings)
    cache = model.new_cache(B, max_len)
    greedy = next_token is None
    step = _greedy_step if greedy else _step
    if compile:
        step = compiled_step(device.type, greedy)
    # The prompt: eager, with every input check (ids in range, cache room).
    hidden = model.hidden_states(input_ids, cache=cache)[:, -1]  # (B, H)
    logits = model.lm_head(hidden)  # (B, V)
    token = logits.argmax(dim=-1) if greedy else next_token(logits)  # (B,)
    input_pos = torch.tensor([S], device=device)  # (1,): the position of `token`
    bad = torch.zeros((), dtype=torch.bool, device=device)
    if greedy:
        # The whole sequence lives in one buffer of the cache's (bucketed) length, so its
        # shape, like the cache's, is the same for every generation in the bucket.
        ids = torch.zeros((B, max_len), dtype=torch.int64, device=device)
        ids[:, :S] = input_ids
        ids[:, S] = token
        if compile and device.type == "cuda":
            _mark_static(cache, ids, input_pos, bad)
        for i in range(max_new_tokens - 1):
            with _guards_checked_once(compile, i):
                step(model, ids, input_pos, cache, bad)
        tokens = ids[:, : S + max_new_tokens].clone()  # not a view of the bucket's buffer
    else:
        if compile and device.type == "cuda":
            _mark_static(cache)
        pieces = [input_ids, token[:, None]]
        for i in range(max_new_tokens - 1):
            with _guards_checked_once(compile, i):
                logits, step_bad = step(model, token[:, None], input_pos, cache)  # (B, V), ()
            # Read now: with CUDA graphs the step's outputs are overwritten by the next replay.
            bad = bad | step_bad
            token = next_token(logits)
            pieces.append(token[:, None])
            input_pos += 1
        tokens = torch.cat(pieces, dim=1)
    cache.set_length(S + max_new_tokens - 1)
    if bad.item():  # the one check of the selectors' choices, after the last step
        raise ValueError(
            "a selector chose an expert outside [0, num_experts) during the static decode "
            "(the step clamped it to stay in bounds; the tokens are discarded); run with "
            "compile=False for the layer and the index"
        )
    return tokens


def _guards_checked_once(compile: bool, step_index: int):
    """The first step of a generation checks dynamo's guards in full (and compiles, if
    this model, batch or cache bucket is new); the later ones run only the guards that
    tell the compiled graphs apart. Within one generation nothing those guards watch can
    change: the same model, selectors (traceable ones keep no Python state) and buffers,
    with the same shapes, under no_grad. Checking them all again would cost a sizeable
    share of a small model's step. Left alone when the caller set a stance of their own."""
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", None)
    if not compile or step_index == 0 or stance != "default":
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def _mark_static(cache: ModelKVCache, *buffers: torch.Tensor) -> None:
    """CUDA graphs replay fixed addresses: the cache's tensors (and the greedy step's
    buffers), mutated by every step, must be static inputs (as parameters are) or the
    graph is not used. guard=False: new buffers of the same shapes reuse the graph
    instead of recompiling."""
    for layer in cache.values():
        torch._dynamo.mark_static_address(layer.k_cache, guard=False)
        torch._dynamo.mark_static_address(layer.v_cache, guard=False)
    for buffer in buffers:
        torch._dynamo.mark_static_address(buffer, guard=False)


def warn_eager(reason: str) -> None:
    warnings.warn(f"generate(compile=True) decodes eagerly: {reason}", RuntimeWarning, stacklevel=3)
