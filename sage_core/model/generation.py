"""Generation with the KV cache, and teacher-forced perplexity."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sage_core.model import decode
from sage_core.model.config import as_index

# Rows of hidden states pushed through the lm head at once when scoring: bounds the
# float32 logits held in memory (rows x vocab) for a real 152k vocabulary.
SCORE_CHUNK = 256


def _int_arg(name: str, value, minimum: int) -> int:
    try:
        value = as_index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_lm_head(model):
    if getattr(model, "lm_head", None) is None:
        raise ValueError("this checkpoint has no lm_head (a bare text model); it cannot score")


def _next_token(logits, temperature, top_p, generator):
    """logits (B, V) -> (B,) tokens: argmax at temperature 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.float32) / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, compile=False
):
    """Extend `input_ids` (B, S) by `max_new_tokens` tokens -> LongTensor (B, S + new).

    Greedy at temperature 0; otherwise top-p sampling from a torch.Generator seeded
    with `seed` (the global RNG when seed is None). The prompt is run once, then each
    new token is one step over the KV cache.

    compile=True: each new token is one call of a torch.compile'd static-shape step
    (sage_core.model.decode); the first call in a process compiles it (seconds from
    inductor's on-disk cache, tens of seconds cold), so it pays on long or many
    generations. Without a C++ compiler (CPU) it raises CompileUnavailable at once. What
    the step cannot trace (experts on demand, a selector not marked compile_traceable, a
    routing trace) decodes eagerly with a RuntimeWarning saying why.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise ValueError(f"input_ids must be a (B, S) tensor, got shape {shape}")
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 0)
    if not isinstance(temperature, int | float) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None:
        seed = _int_arg("seed", seed, 0)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    _check_lm_head(model)
    if compile:
        decode.check_compiler(input_ids.device)  # before any work: fail at once
    if max_new_tokens == 0:
        return input_ids.clone()

    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    if compile:
        reason = decode.eager_reason(model)
        if reason is None:
            # Greedy: the token is picked inside the compiled step (None); sampling draws
            # from the generator eagerly between steps.
            pick = None
            if temperature > 0:
                pick = lambda logits: _next_token(logits, temperature, top_p, generator)  # noqa: E731
            return decode.generate_static(model, input_ids, max_new_tokens, pick, compile=True)
        decode.warn_eager(reason)
    B, S = input_ids.shape
    cache = model.new_cache(B, S + max_new_tokens)
    # Only the last position's logits are needed: skip the lm head for the rest.
    hidden = model.hidden_states(input_ids, cache=cache)[:, -1]
    tokens = [input_ids]
    for step in range(max_new_tokens):
        token = _next_token(model.lm_head(hidden), temperature, top_p, generator)
        tokens.append(token[:, None])  # (B, 1)
        if step + 1 < max_new_tokens:
            hidden = model.hidden_states(token[:, None], cache=cache)[:, -1]
    return torch.cat(tokens, dim=1)


@dataclass(frozen=True)
class Perplexity:
    mean_nll: float  # nats per scored token
    perplexity: float  # exp(mean_nll)
    num_tokens: int  # tokens scored (all but the first)


def window_plan(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """[(start, end, first_target)] over a stream of n tokens: run tokens [start, end),
    score targets [first_target, end). Every window holds min(window, n) tokens; every
    target 1 .. n - 1 is scored exactly once, with at least `window - stride` tokens of
    left context once the first window is full."""
    end = min(window, n)
    plan = [(0, end, 1)]
    while end < n:
        first_target, end = end, min(end + stride, n)
        plan.append((end - window, end, first_target))
    return plan


@torch.no_grad()
def perplexity(model, token_ids, window=None, stride=None) -> Perplexity:
    """Teacher-forced perplexity of one sequence, token_ids 1-D or (1, N).

    Token t is scored by the model's prediction from the tokens before it. With
    `window` smaller than N, the sequence is run in windows of `window` tokens that
    advance by `stride` (default window // 2); each token is scored once, in the
    window that ends with its chunk, so it sees at least window - stride tokens of
    context. Positions restart at 0 in every window.
    """
    if not isinstance(token_ids, torch.Tensor):
        raise ValueError(f"token_ids must be a tensor, got {type(token_ids).__name__}")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D or (1, N), got shape {tuple(token_ids.shape)}")
    n = token_ids.shape[0]
    if n < 2:
        raise ValueError(f"token_ids needs at least 2 tokens to score one, got {n}")
    _check_lm_head(model)
    if window is None:
        if stride is not None:
            raise ValueError("stride needs a window; pass window as well")
        window = n
    window = _int_arg("window", window, 2)
    if stride is None:
        stride = max(1, window // 2)
    stride = _int_arg("stride", stride, 1)
    if stride >= window:
        raise ValueError(
            f"stride must be smaller than window ({window}) so every scored token has "
            f"context, got {stride}"
        )

    total_nll = 0.0  # a Python float: the metric's accumulator, not an activation
    count = 0
    for start, end, first_target in window_plan(n, window, stride):
        ids = token_ids[start:end][None]  # (1, end - start)
        hidden = model.hidden_states(ids)[0]
        # Target t is predicted from the hidden state at t - 1.
        predictors = hidden[first_target - 1 - start : end - 1 - start]
        targets = token_ids[first_target:end].to(hidden.device)
        for i in range(0, targets.shape[0], SCORE_CHUNK):
            logits = model.lm_head(predictors[i : i + SCORE_CHUNK]).to(torch.float32)
            nll = F.cross_entropy(logits, targets[i : i + SCORE_CHUNK], reduction="sum")
            total_nll += nll.item()
        count += targets.shape[0]
    mean_nll = total_nll / count
    return Perplexity(mean_nll=mean_nll, perplexity=math.exp(mean_nll), num_tokens=count)
