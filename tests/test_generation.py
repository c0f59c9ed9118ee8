"""generate() with the KV cache and perplexity(), against full recomputation by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from sage_core.model.attention import KVCache
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.generation import generate, perplexity, window_plan
from sage_core.model.thinker import Qwen3OmniThinker

CONFIG = ThinkerTextConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    rope_theta=10_000.0,
    mrope_section=(2, 3, 3),
    mlp_only_layers=(1,),
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen3OmniThinker(CONFIG)
    # Weights large enough that the next token depends on the whole context.
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return m.eval()


def prompt(batch, length, seed):
    return torch.randint(
        0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def test_greedy_kv_cache_generation_equals_full_recomputation(model):
    ids = prompt(2, 5, 1)
    out = generate(model, ids, max_new_tokens=12)
    assert out.shape == (2, 17) and out.dtype == torch.int64
    assert torch.equal(out[:, :5], ids)
    expected = ids
    with torch.no_grad():
        for _ in range(12):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)
    assert len(set(out[0, 5:].tolist())) > 1  # not a degenerate constant stream


def test_cached_chunks_give_the_same_logits_as_one_forward(model):
    # A multi-token chunk after a non-empty cache needs the offset causal mask.
    ids = prompt(2, 10, 2)
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        full = model(ids)
        parts = [
            model(ids[:, :4], cache=cache),
            model(ids[:, 4:5], cache=cache),
            model(ids[:, 5:], cache=cache),
        ]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        model(ids[:, :1], cache=cache)


def test_kv_cache_update_writes_the_chunk_and_advances():
    cache = KVCache(batch=1, max_len=6, kv_heads=2, head_dim=4, device="cpu", dtype=torch.float32)
    first = torch.randn(1, 2, 3, 4)
    k, v = cache.update(0, first, -first)
    assert cache.length == 3 and torch.equal(k, first) and torch.equal(v, -first)
    second = torch.randn(1, 2, 2, 4)
    k, v = cache.update(3, second, -second)  # (B, kv_heads, 5, head_dim): all so far
    assert cache.length == 5 and torch.equal(k, torch.cat([first, second], 2))
    assert torch.equal(v, -torch.cat([first, second], 2))


def test_a_forward_that_fails_part_way_leaves_the_cache_usable(model):
    ids = prompt(1, 6, 4)
    cache = model.new_cache(1, 6)
    own = model.sparse_blocks()[0].selector

    def fail_in_layer_2(router_logits, layer_idx, hidden_states):
        if layer_idx == 2:
            raise RuntimeError("selector failed")
        return own(router_logits, layer_idx, hidden_states)

    with torch.no_grad():
        model(ids[:, :3], cache=cache)
        model.set_selector(fail_in_layer_2)
        try:
            with pytest.raises(RuntimeError, match="selector failed"):
                model(ids[:, 3:4], cache=cache)
        finally:
            model.set_selector(None)
        # Every layer's attention stored position 3 before layer 2's experts failed.
        held = cache.length
        assert held == 4
        rest = model(ids[:, held:], cache=cache)
        full = model(ids)
    torch.testing.assert_close(rest, full[:, held:], atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    ids = prompt(1, 4, 3)
    a = generate(model, ids, 20, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, ids, 20, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, ids, 20, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tiny_top_p_is_greedy(model):
    ids = prompt(2, 4, 4)
    sampled = generate(model, ids, 8, temperature=0.7, top_p=1e-6, seed=1)
    assert torch.equal(sampled, generate(model, ids, 8))


def test_generate_rejects_bad_arguments(model):
    ids = prompt(1, 3, 5)
    for kwargs, name in [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1), "temperature"),
        (dict(max_new_tokens=2, top_p=0), "top_p"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=name):
            generate(model, ids, **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], 2)
    assert torch.equal(generate(model, ids, 0), ids)


def hand_nll(model, ids):
    """Summed NLL of ids[1:] given ids[:-1] from one full forward."""
    with torch.no_grad():
        logits = model(ids[None])[0, :-1].double()
    return -logits.log_softmax(-1).gather(-1, ids[1:, None]).sum().item(), len(ids) - 1


def test_perplexity_is_exp_of_mean_nll_of_a_full_forward(model):
    ids = prompt(1, 24, 6)[0]
    total, n = hand_nll(model, ids)
    for token_ids in (ids, ids[None]):
        result = perplexity(model, token_ids)
        assert result.num_tokens == n == 23
        assert result.mean_nll == pytest.approx(total / n, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


def test_window_at_least_the_length_equals_the_full_value(model):
    ids = prompt(1, 16, 7)[0]
    full = perplexity(model, ids)
    for window in (16, 40):
        assert perplexity(model, ids, window=window).mean_nll == pytest.approx(
            full.mean_nll, rel=1e-6
        )


@pytest.mark.parametrize("window, stride", [(8, 4), (8, 3), (6, 5), (5, 1)])
def test_sliding_window_perplexity_equals_hand_computation(model, window, stride):
    ids = prompt(1, 23, 8)[0]
    # By hand: token t is scored once, in the window ending with its chunk.
    total, count, scored = 0.0, 0, []
    first_end = window
    with torch.no_grad():
        logp = model(ids[None, :first_end])[0].log_softmax(-1)
    for t in range(1, first_end):
        total -= logp[t - 1, ids[t]].item()
        scored.append(t)
    end = first_end
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        start = new_end - window
        with torch.no_grad():
            logp = model(ids[None, start:new_end])[0].log_softmax(-1)
        for t in range(end, new_end):
            assert t - start >= window - stride  # left context the window allows
            total -= logp[t - 1 - start, ids[t]].item()
            scored.append(t)
        end = new_end
    count = len(scored)
    assert scored == list(range(1, len(ids)))  # every token but the first, once
    result = perplexity(model, ids, window=window, stride=stride)
    assert result.num_tokens == count
    assert result.mean_nll == pytest.approx(total / count, rel=1e-5)
    # Less context than a full forward really changes the value.
    assert result.mean_nll != pytest.approx(perplexity(model, ids).mean_nll, rel=1e-4)


def test_window_plan_scores_every_token_once():
    for n, window, stride in [(2, 2, 1), (10, 3, 2), (100, 17, 16), (9, 20, 3)]:
        targets = [t for s, e, first in window_plan(n, window, stride) for t in range(first, e)]
        assert targets == list(range(1, n))
        assert all(
            0 <= s < first and e - s <= window for s, e, first in window_plan(n, window, stride)
        )


def test_perplexity_rejects_bad_arguments(model):
    ids = prompt(1, 10, 9)[0]
    cases = [
        (dict(token_ids=ids[:1]), "token_ids"),
        (dict(token_ids=ids.view(2, 5)), "token_ids"),
        (dict(token_ids=ids, window=1), "window"),
        (dict(token_ids=ids, window=4, stride=4), "stride"),
        (dict(token_ids=ids, window=4, stride=0), "stride"),
        (dict(token_ids=ids, stride=2), "stride"),
        (dict(token_ids=ids, window="4"), "window"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            perplexity(model, **kwargs)


def test_bfloat16_model_gives_bfloat16_logits_close_to_float32(model):
    bf16 = Qwen3OmniThinker(CONFIG)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    ids = prompt(2, 12, 10)
    with torch.no_grad():
        ref = model(ids)
        got = bf16(ids)
    assert got.dtype == torch.bfloat16
    # Tolerance: bf16 keeps 8 bits of mantissa; over 3 layers with routing the logits
    # stay within 5% of their range and the probabilities within 0.05 in total variation
    # for nearly every position (a near-tie in the router may flip one expert).
    scale = ref.abs().max()
    err = (got.float() - ref).abs()
    assert err.median() < 0.02 * scale
    tv = 0.5 * (F.softmax(got.float(), -1) - F.softmax(ref, -1)).abs().sum(-1)
    assert (tv < 0.05).float().mean() >= 0.9


def test_no_float32_or_float64_activation_in_a_bfloat16_forward(model):
    bf16 = Qwen3OmniThinker(CONFIG)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    seen = []

    def record(module, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        seen.extend(
            (type(module).__name__, o.dtype)
            for o in outputs
            if isinstance(o, torch.Tensor) and o.is_floating_point()
        )

    handles = [m.register_forward_hook(record) for m in bf16.modules() if m is not bf16]
    try:
        with torch.no_grad():
            bf16(prompt(1, 6, 11))
    finally:
        for h in handles:
            h.remove()
    assert seen and all(dtype == torch.bfloat16 for _, dtype in seen), seen
