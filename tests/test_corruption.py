"""Corrupted experts, recovery fraction and precision@m (sage_core.studies.unreliable_experts)."""

import math

import pytest
import torch

from sage_core.checkpoint import load_thinker, save_thinker_checkpoint
from sage_core.corpus import CONTEXTS
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.studies import unreliable_experts as co
from sage_core.studies.experiments import Sample
from sage_core.trust import TrustTable

CONFIG = ThinkerTextConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=0,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    mrope_section=(3, 3, 2),
)
CHOSEN = {0: [1, 5], 1: [0, 6]}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen3OmniThinker(CONFIG).eval()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_corruption_keeps_norm_touches_only_chosen_and_restores():
    model = tiny_model()
    before = state(model)
    with co.corrupted(model, CHOSEN, seed=7):
        after = state(model)
        for key, value in before.items():
            if not key.endswith("mlp.experts.down_proj"):
                assert torch.equal(after[key], value), key
                continue
            layer = int(key.split(".")[2])
            for e in range(CONFIG.num_experts):
                if e in CHOSEN[layer]:
                    assert not torch.equal(after[key][e], value[e])
                    assert after[key][e].norm() == pytest.approx(float(value[e].norm()), rel=1e-6)
                else:
                    assert torch.equal(after[key][e], value[e]), (key, e)
    restored = state(model)
    assert all(torch.equal(restored[k], v) for k, v in before.items())


def test_corruption_is_seeded():
    model = tiny_model()
    key = "model.layers.0.mlp.experts.down_proj"
    with co.corrupted(model, CHOSEN, seed=3):
        first = state(model)[key]
    with co.corrupted(model, CHOSEN, seed=3):
        again = state(model)[key]
    with co.corrupted(model, CHOSEN, seed=4):
        other = state(model)[key]
    assert torch.equal(first, again)
    assert not torch.equal(first[1], other[1])


def test_corruption_refuses_bad_targets(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="layer 9 is not a sparse layer"):
        co.corrupt_experts(model, {9: [0]}, seed=0)
    with pytest.raises(ValueError, match="expert 8 out of range"):
        co.corrupt_experts(model, {0: [8]}, seed=0)
    save_thinker_checkpoint(model.state_dict(), CONFIG, tmp_path, num_shards=1)
    on_demand = load_thinker(tmp_path, max_resident_experts=4)
    with pytest.raises(ValueError, match="resident experts"):
        co.corrupt_experts(on_demand, {0: [1]}, seed=0)


def test_usage_counts_every_choice_and_choice_is_seeded_among_most_used():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    samples = [
        Sample(
            c,
            "train",
            0,
            0,
            torch.randint(0, 64, (6,), generator=gen),
            torch.randint(0, 64, (4,), generator=gen),
        )
        for c in CONTEXTS
    ]
    usage = co.expert_usage(model, samples)
    assert sorted(usage) == [0, 1]
    for counts in usage.values():
        assert int(counts.sum()) == 3 * 10 * CONFIG.num_experts_per_tok

    usage = {0: torch.tensor([5, 9, 1, 7, 7, 0, 3, 2]), 1: torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])}
    chosen = co.choose_corrupted(usage, m=2, pool=3, seed=0)
    assert set(chosen[0]) <= {1, 3, 4} and set(chosen[1]) <= {4, 5, 6}  # ties: lower index
    assert all(len(set(v)) == 2 for v in chosen.values())
    assert chosen == co.choose_corrupted(usage, m=2, pool=3, seed=0)
    assert co.choose_corrupted(usage, m=2, pool=2, seed=9) == {0: [1, 3], 1: [4, 5]}
    assert len({tuple(co.choose_corrupted(usage, 1, 3, s)[0]) for s in range(20)}) > 1
    with pytest.raises(ValueError, match="pool"):
        co.choose_corrupted(usage, m=3, pool=2, seed=0)


def test_recovery_fraction_hand_cases():
    assert co.recovery_fraction(10.0, 20.0, 15.0) == pytest.approx(0.5)
    assert co.recovery_fraction(10.0, 20.0, 10.0) == pytest.approx(1.0)
    assert co.recovery_fraction(10.0, 20.0, 20.0) == 0.0
    assert co.recovery_fraction(10.0, 20.0, 25.0) == pytest.approx(-0.5)  # trust hurt
    with pytest.raises(ValueError, match="did not raise perplexity"):
        co.recovery_fraction(10.0, 10.0, 9.0)
    with pytest.raises(ValueError, match="finite"):
        co.recovery_fraction(10.0, math.nan, 9.0)


def test_precision_at_m_and_lowest_trust():
    assert co.precision_at_m([1, 2], [2, 3]) == 0.5
    assert co.precision_at_m([3, 2], [2, 3]) == 1.0
    assert co.precision_at_m([0], [5]) == 0.0
    with pytest.raises(ValueError):
        co.precision_at_m([1], [2, 3])
    with pytest.raises(ValueError):
        co.precision_at_m([1, 1], [1, 3])

    table = TrustTable([0, 1], CONTEXTS, 6)
    table.trust[0, :, 4] = -1.0  # low in every context
    table.trust[0, 0, 2] = -2.0  # lower in one context, mean -2/3
    table.trust[0, 1, 5] = 0.5
    assert co.lowest_trust(table, 0, 2) == [4, 2]
    assert co.lowest_trust(table, 0, 3) == [4, 2, 0]  # ties at 0: lower index first
    assert co.lowest_trust(table, 1, 2) == [0, 1]
    assert torch.allclose(co.expert_trust(table, 0), torch.tensor([0, 0, -2 / 3, 0, -1, 0.5 / 3]))


def test_protocol_validates():
    with pytest.raises(ValueError, match="m <= pool"):
        co.CorruptionProtocol(m=3, pool=2)
    with pytest.raises(ValueError, match="context_source"):
        co.CorruptionProtocol(context_source="oracle")
    assert co.CorruptionProtocol(num_updates=50, eval_every=20).eval_steps() == [0, 20, 40, 50]
