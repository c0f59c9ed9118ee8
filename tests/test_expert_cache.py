"""The LRU expert cache and the on-demand expert provider, without a model."""

import random
from collections import OrderedDict

import pytest
import torch

from sage_core.checkpoint import (
    ExpertCache,
    ExpertSource,
    OnDemandExperts,
    SafetensorsReader,
    save_thinker_checkpoint,
)
from sage_core.model.config import ThinkerTextConfig

CFG = ThinkerTextConfig(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    intermediate_size=0,
    moe_intermediate_size=6,
    num_experts=5,
    num_experts_per_tok=2,
    mrope_section=(2, 1, 1),
)


def loader(value, nbytes=10, log=None):
    def load():
        if log is not None:
            log.append(value)
        return value, nbytes

    return load


def test_lru_order_hits_misses_evictions():
    cache = ExpertCache(3)
    for key in ["a", "b", "c", "a", "d"]:  # "a" is reused, so "b" is the LRU when "d" arrives
        assert cache.get(key, loader(key.upper())) == key.upper()
    assert cache.keys() == ["c", "a", "d"]
    assert "b" not in cache and len(cache) == 3
    assert cache.stats() == {
        "hits": 1,
        "misses": 4,
        "evictions": 1,
        "bytes_read": 40,
        "peak_resident": 3,
        "resident": 3,
        "capacity": 3,
        "recycled": 0,
        "policy": "lru",
        "prefetched": 0,
        "prefetch_bytes": 0,
        "wasted": 0,
    }


def test_hit_does_not_reload_or_count_bytes():
    cache, log = ExpertCache(2), []
    cache.get((0, 1), loader("w", 7, log))
    for _ in range(5):
        assert cache.get((0, 1), loader("other", 7, log)) == "w"
    assert log == ["w"]
    assert cache.stats()["hits"] == 5 and cache.stats()["bytes_read"] == 7


def test_eviction_happens_before_the_load_so_the_bound_always_holds():
    cache = ExpertCache(2)
    seen_sizes = []

    def load():
        seen_sizes.append(len(cache))  # what the cache holds while a new expert is read
        return "w", 1

    for key in range(6):
        cache.get(key, load)
    assert max(seen_sizes) == 1  # never capacity entries plus the one being read
    assert cache.stats()["evictions"] == 4


def test_failed_load_inserts_nothing_and_is_retried():
    cache = ExpertCache(2)

    def boom():
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.get("k", boom)
    assert "k" not in cache
    assert cache.get("k", loader("ok")) == "ok"
    assert cache.stats()["misses"] == 2 and cache.stats()["bytes_read"] == 10


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_matches_a_reference_lru_and_never_exceeds_the_bound(capacity):
    rng = random.Random(capacity)
    cache, reference = ExpertCache(capacity), OrderedDict()
    hits = misses = evictions = 0
    distinct = set()
    for _ in range(400):
        key = (rng.randrange(3), rng.randrange(6))
        distinct.add(key)
        cache.get(key, loader(key, 3))
        if key in reference:
            reference.move_to_end(key)
            hits += 1
        else:
            misses += 1
            if len(reference) == capacity:
                reference.popitem(last=False)
                evictions += 1
            reference[key] = key
        assert cache.keys() == list(reference)
        assert len(cache) <= capacity
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (hits, misses, evictions)
    assert stats["bytes_read"] == 3 * misses
    assert stats["peak_resident"] == min(capacity, len(distinct))
    assert stats["peak_resident"] <= capacity


@pytest.mark.parametrize("capacity", [0, -1, True, 2.0, "3"])
def test_bad_capacity_is_a_value_error(capacity):
    with pytest.raises(ValueError, match="max_resident_experts"):
        ExpertCache(capacity)


def write_experts(tmp_path, experts, file_dtype):
    gen = torch.Generator().manual_seed(0)
    e, i, h = CFG.num_experts, CFG.moe_intermediate_size, CFG.hidden_size
    state = {
        "model.embed_tokens.weight": torch.randn(CFG.vocab_size, h, generator=gen),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(e, 2 * i, h, generator=gen),
        "model.layers.0.mlp.experts.down_proj": torch.randn(e, h, i, generator=gen),
    }
    save_thinker_checkpoint(state, CFG, tmp_path, experts=experts, num_shards=2, dtype=file_dtype)
    return state


@pytest.mark.parametrize("experts", ["per_expert", "fused"])
def test_on_demand_experts_read_one_expert_at_a_time(tmp_path, experts):
    state = write_experts(tmp_path, experts, torch.bfloat16)
    reader = SafetensorsReader(tmp_path)
    source = ExpertSource(reader, "thinker.model.layers.0.mlp.experts.", CFG, torch.float32, "cpu")
    assert source.fused == (experts == "fused")
    source.validate()
    cache = ExpertCache(2)
    provider = OnDemandExperts(0, source, cache)
    assert provider.num_experts == CFG.num_experts
    assert list(provider.parameters()) == []

    for e in [3, 1, 3, 4]:
        gate_up, down = provider.expert(e)
        assert gate_up.dtype == torch.float32 and down.dtype == torch.float32
        want_gate_up = state["model.layers.0.mlp.experts.gate_up_proj"][e].to(torch.bfloat16)
        want_down = state["model.layers.0.mlp.experts.down_proj"][e].to(torch.bfloat16)
        torch.testing.assert_close(gate_up, want_gate_up.float(), rtol=0, atol=0)
        torch.testing.assert_close(down, want_down.float(), rtol=0, atol=0)

    one_expert_bytes = 3 * CFG.moe_intermediate_size * CFG.hidden_size * 2  # bf16 in the file
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 3, 1)
    assert stats["bytes_read"] == 3 * one_expert_bytes  # a fused tensor is sliced, not read whole
    assert cache.keys() == [(0, 3), (0, 4)]
    with pytest.raises(IndexError, match="expert 5 out of range"):
        provider.expert(5)


def _provider(tmp_path, experts="per_expert", capacity=2):
    state = write_experts(tmp_path, experts, torch.float32)
    reader = SafetensorsReader(tmp_path)
    source = ExpertSource(reader, "thinker.model.layers.0.mlp.experts.", CFG, torch.float32, "cpu")
    cache = ExpertCache(capacity)
    return OnDemandExperts(0, source, cache), cache, state


def _want(state, e):
    return (
        state["model.layers.0.mlp.experts.gate_up_proj"][e],
        state["model.layers.0.mlp.experts.down_proj"][e],
    )


@pytest.mark.parametrize("experts", ["per_expert", "fused"])
def test_a_full_cache_reads_into_evicted_buffers_nobody_holds(tmp_path, experts):
    provider, cache, state = _provider(tmp_path, experts)
    addresses = set()
    for e in [0, 1, 2, 3, 4, 0, 2]:
        gate_up, down = provider.expert(e)
        torch.testing.assert_close((gate_up, down), _want(state, e), rtol=0, atol=0)
        addresses.add(gate_up.data_ptr())
        del gate_up, down
    stats = cache.stats()
    assert stats["evictions"] == 5 and stats["recycled"] == 5
    assert len(addresses) == 2  # the two buffers of the first two misses, nothing new


def test_an_evicted_expert_someone_still_holds_is_never_overwritten(tmp_path):
    provider, cache, state = _provider(tmp_path)
    held_gate_up, _ = provider.expert(0)
    view_of_down = provider.expert(1)[1][:2]
    gate_up, _ = provider.expert(2)  # evicts 0 (held): a fresh buffer
    x = torch.randn(3, CFG.hidden_size, requires_grad=True)
    saved_for_backward = torch.nn.functional.linear(x, gate_up).sum()  # autograd saves it
    del gate_up
    for e in [3, 4, 0, 1]:  # evicts 1 (a view held), 2 (saved), 3, 4 ...
        provider.expert(e)
    torch.testing.assert_close(held_gate_up, _want(state, 0)[0], rtol=0, atol=0)
    torch.testing.assert_close(view_of_down, _want(state, 1)[1][:2], rtol=0, atol=0)
    saved_for_backward.backward()
    want_grad = _want(state, 2)[0].sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, want_grad)
    stats = cache.stats()
    # Evictions of 0, 1 and 2 found them held; the later ones (3 and 4, released) recycle.
    assert stats["evictions"] == 5 and stats["recycled"] == 2


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_recycling_works_across_inference_mode_and_no_grad(tmp_path, file_dtype):
    """bf16 in the file converts through copy_, which an inference tensor would refuse
    outside inference_mode: cached buffers are always normal tensors."""
    state = write_experts(tmp_path, "per_expert", file_dtype)
    reader = SafetensorsReader(tmp_path)
    source = ExpertSource(reader, "thinker.model.layers.0.mlp.experts.", CFG, torch.float32, "cpu")
    cache = ExpertCache(2)
    provider = OnDemandExperts(0, source, cache)
    for e, mode in zip([0, 1, 2, 3, 4, 0], [torch.inference_mode, torch.no_grad] * 3):
        with mode():
            gate_up, down = provider.expert(e)
            want = _want(state, e)
            want = tuple(w.to(file_dtype).float() for w in want)
            torch.testing.assert_close((gate_up, down), want, rtol=0, atol=0)
            del gate_up, down
    assert cache.stats()["recycled"] == 4
