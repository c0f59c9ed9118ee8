"""Low-bit experts and the precision actuator (sage_core.studies.low_bit)."""

import math

import pytest
import scipy.stats
import torch
from checkpoints import toy_config

from sage_core.corpus import CONTEXTS
from sage_core.dtypes.quantize import fake_quantize
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.studies import low_bit, trust_runs
from sage_core.studies.experiments import Sample

# Widths of 128 and 64 inputs: groups of 64, as on the real checkpoint and the tiny model.
WIDE = toy_config(
    vocab_size=64, hidden_size=128, moe_intermediate_size=64, num_experts=32, num_experts_per_tok=4
)
SMALL = toy_config(vocab_size=64)


def model_of(config, seed=0):
    torch.manual_seed(seed)
    return Qwen3OmniThinker(config).eval()


def windows(n_per_context=2, seed=0, length=12, vocab=64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_per_context):
        for context in CONTEXTS:
            ids = torch.randint(0, vocab, (length,), generator=gen)
            out.append(Sample(context, "heldout", i, 0, ids[: length // 2], ids[length // 2 :]))
    return out


def test_mixed_plan_is_the_stated_accounting():
    # bytes per group of 64: 8 * bits + 4 (a float16 scale and zero): 68, 28, 20
    plan = low_bit.mixed_plan(32, 68, 28, 20)
    assert plan == low_bit.Plan(eight=5, three=2, two=25)
    assert 5 * 68 + 2 * 28 + 25 * 20 == 32 * 28
    for E in range(1, 70):
        p = low_bit.mixed_plan(E, 68, 28, 20)
        used = p.eight * 68 + p.three * 28 + p.two * 20
        assert p.eight + p.three + p.two == E and used <= E * 28
        assert (p.eight + 1) * 68 + (E - p.eight - 1) * 20 > E * 28  # no room for one more
        assert used + 8 > E * 28 or p.two == 0  # no room for one more 3-bit expert


def test_byte_accounting_is_equal_across_allocations_and_counts_every_group():
    model = model_of(WIDE)
    plan = low_bit.plan_for(model)
    assert plan == low_bit.Plan(eight=5, three=2, two=25)
    # one expert: gate_up 128 x 128 and down 128 x 64 weights, one group per 64 of them
    weights = 128 * 128 + 128 * 64
    for bits in (2, 3, 8):
        assert low_bit.expert_bytes(model, bits) == weights * bits / 8 + (weights // 64) * 4
    uniform = low_bit.Precision(model, low_bit.uniform_bits(model, 3)).nbytes()
    assert uniform == 2 * 32 * low_bit.expert_bytes(model, 3)  # 2 layers x 32 experts
    usage = {layer: torch.arange(32).flip(0) for layer in model.sparse_blocks()}
    for ranking in (low_bit.rank_by(usage), low_bit.random_ranking(model, 5, 0)):
        mixed = low_bit.Precision(model, low_bit.allocate(ranking, plan))
        assert mixed.nbytes() == uniform
        assert all(sorted(v) == [2] * 25 + [3] * 2 + [8] * 5 for v in mixed.bits.values())


def test_allocation_gives_eight_bits_to_the_highest_scores():
    plan = low_bit.Plan(eight=2, three=1, two=3)
    scores = {0: [0.1, 0.9, -0.3, 0.5, 0.0, 0.2], 3: [1.0, 0.0, 0.0, 2.0, -1.0, 0.0]}
    tie = {0: [0] * 6, 3: [0, 5, 1, 0, 0, 9]}  # ties among the zeros: more used first
    ranking = low_bit.rank_by(scores, tie)
    assert ranking == {0: [1, 3, 5, 0, 4, 2], 3: [3, 0, 5, 1, 2, 4]}
    bits = low_bit.allocate(ranking, plan)
    assert bits == {0: [2, 8, 2, 8, 2, 3], 3: [8, 2, 2, 8, 2, 3]}
    with pytest.raises(ValueError, match="every expert once"):
        low_bit.allocate({0: [0, 0, 1, 2, 3, 4]}, plan)


def test_oracle_exclusions_take_the_largest_positive_harms():
    harm = {"code": {0: torch.tensor([0.3, -0.1, 0.5, 0.0, 0.2, 0.1], dtype=torch.float64)}}
    assert low_bit.oracle_exclusions(harm, 2, top_k=2, num_experts=6) == {"code": {0: [0, 2]}}
    assert low_bit.oracle_exclusions(harm, 9, top_k=2, num_experts=6) == {"code": {0: [0, 2, 4, 5]}}


def direct_nll(model, ws, selector=None, breakage=None):
    """{context: NLL per scored continuation token}, scored by trust_runs.score_windows."""
    rows = trust_runs.score_windows(model, ws, selector, breakage)
    return {
        c: sum(r["nll_sum"] for r in rows if r["context"] == c)
        / sum(r["tokens"] for r in rows if r["context"] == c)
        for c in CONTEXTS
    }


def test_exhaustive_harm_matches_a_direct_measurement_of_every_cell():
    model = model_of(SMALL)
    ws = windows()
    breakage = trust_runs.Breakage(model, low_bit.all_experts(model), "int2")
    harm = low_bit.exhaustive_harm(model, ws, breakage, max_batch=5)  # cells split over forwards
    base = direct_nll(model, ws, None, breakage)
    nonzero = 0
    for context in CONTEXTS:
        for layer in sorted(model.sparse_blocks()):
            for e in range(SMALL.num_experts):
                excluded = {context: {layer: [e]}}
                without = direct_nll(model, ws, low_bit.oracle_selector(model, excluded), breakage)
                direct = base[context] - without[context]
                assert float(harm[context][layer][e]) == pytest.approx(direct, abs=1e-5)
                nonzero += abs(direct) > 1e-4
    assert nonzero > 10


def test_upgrade_gain_matches_a_direct_measurement():
    model = model_of(SMALL)
    ws = windows(seed=1)
    gain = low_bit.upgrade_gain(model, ws)

    def total(bits):
        rows = trust_runs.score_windows(model, ws, None, low_bit.Precision(model, bits))
        return sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows)

    reference = total(low_bit.uniform_bits(model, 2))
    for layer, e in [(0, 1), (1, 6), (0, 7)]:
        bits = low_bit.uniform_bits(model, 2)
        bits[layer][e] = 8
        assert float(gain[layer][e]) == pytest.approx(reference - total(bits), abs=1e-6)


def test_upgrade_attribution_estimates_the_measured_upgrade_gain():
    # Raising one expert from 2 to 8 bits moves its layer's output a little: the
    # first-order estimate from one backward pass must agree with the measured gain.
    model = model_of(SMALL)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ws = windows(seed=1)
    estimate = low_bit.upgrade_attribution(model, ws, batch=4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored
    gain = low_bit.upgrade_gain(model, ws)
    est = torch.cat([estimate[layer] for layer in sorted(gain)])
    true = torch.cat([gain[layer] for layer in sorted(gain)])
    assert true.abs().max() > 1e-4
    # most experts agree closely; one can differ where its upgrade flips a later layer's
    # top-k (a jump no gradient sees)
    err = (est - true).abs() / true.abs().max()
    assert float(err.median()) <= 0.02 and float((err <= 0.05).double().mean()) >= 0.85, (est, true)
    assert scipy.stats.spearmanr(est, true).statistic > 0.9


def test_precision_writes_each_experts_bits_and_restores_the_weights():
    model = model_of(SMALL)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bits = {layer: [2, 3, 4, 8, 2, 2, 3, 8] for layer in model.sparse_blocks()}
    precision = low_bit.Precision(model, bits)
    experts = trust_runs.resident_experts(model, 1)
    with precision.active("code"):
        for e, b in enumerate(bits[1]):
            w = before["model.layers.1.mlp.experts.down_proj"][e]
            expected = fake_quantize(w, b, math.gcd(64, w.shape[-1]))
            assert torch.equal(experts.down_proj[e], expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recovery_table_pools_damaged_seeds_only():
    rows = []
    for seed, (clean, router, arm, oracle) in {
        1: (2.0, 2.2, 2.1, 2.0),
        2: (2.0, 2.005, 2.0, 2.0),  # damaged by 0.25%: left out of the ratio
        3: (2.0, 2.4, 2.3, 2.2),
    }.items():
        for name, ppl in (("router", router), ("counterfactual", arm), ("oracle", oracle)):
            rows.append(
                {
                    "seed": seed,
                    "arm": name,
                    "context": "all",
                    "perplexity": ppl,
                    "clean_perplexity": clean,
                }
            )
    table = low_bit.recovery_table(rows, "counterfactual")
    assert table["damaged_seeds"] == [1, 3]
    assert table["recovery"]["ratio"] == pytest.approx(0.2 / 0.6)
    assert table["relative_to_oracle"]["ratio"] == pytest.approx(0.2 / 0.4)
