"""Notebook 09's hardware timeline (sage_core.studies.offload_timeline): Q3-Omni's costs by
hand, and the default model's read rates carried over as the module says."""

import numpy as np
import pytest

from sage_core.offload.expert_trace import RoutingTrace
from sage_core.studies import offload_timeline as ot


def test_q3omni_layer_costs_by_hand():
    attention_s, experts_s, transfer_s = ot.q3omni_layer_costs(1e9, gpu_bytes_per_s=1e12)
    # q, o: 2 x 2048 x 4096; k, v: 2 x 2048 x 512; router 2048 x 128; bfloat16
    assert attention_s == pytest.approx((2 * 2048 * 4096 + 2 * 2048 * 512 + 2048 * 128) * 2 / 1e12)
    expert = 3 * 2048 * 768 * 2
    assert experts_s == pytest.approx(8 * expert / 1e12)
    assert transfer_s == pytest.approx(expert / 1e9)


def test_q3omni_reads_first_layer_then_the_mean_of_later_layers():
    rates = np.array([[0.5, 0.2, 0.4, 0.0], [0.0, 0.6, 0.0, 0.3]])  # (2, L): demand, ahead
    demand, ahead = ot.q3omni_reads(rates)
    assert demand.shape == ahead.shape == (48,)
    assert demand[0] == pytest.approx(4.0) and demand[1:] == pytest.approx(np.full(47, 1.6))
    assert ahead[0] == 0 and ahead[1:] == pytest.approx(np.full(47, 2.4))


def test_a_step_without_reads_runs_at_the_compute_bound_and_prefetch_is_charged():
    nothing = ot.step(np.zeros((2, 4)), 1e9)
    assert nothing["tokens_per_s"] == pytest.approx(nothing["compute_bound"])
    assert nothing["stalled"] == pytest.approx(0.0, abs=1e-12)
    demand_only = ot.step(np.array([[0.5] * 4, [0.0] * 4]), 1e9)
    with_ahead = ot.step(np.array([[0.5] * 4, [0.0, 0.5, 0.5, 0.5]]), 1e9)
    # on a link-bound step every expert read ahead costs its transfer, overlap or not
    assert with_ahead["experts_per_token"] > demand_only["experts_per_token"]
    assert with_ahead["tokens_per_s"] < demand_only["tokens_per_s"] <= demand_only["transfer_bound"]


def test_read_rates_pool_the_decode_traces_as_shares_of_top_k():
    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]]])  # 2 tokens, 2 layers, top-2
    trace = RoutingTrace(experts, np.full_like(experts, -1), np.arange(2), np.array([0, 1]), 4)
    sets = {7: {"code": {"prefill": trace, "decode": trace}}}
    rates = ot.read_rates(sets, 1.0, "lru", prefetch=False)[7]
    # everything fits: token 0 misses both experts of both layers, token 1 none
    assert rates.tolist() == [[0.5, 0.5], [0.0, 0.0]]


def test_slower_on_every_link_needs_every_link():
    rows = [
        {"seed": s, "arm": arm, "link": link, "tokens_per_s": v}
        for s, arm, link, v in (
            (0, "a", "x", 1.0),
            (0, "b", "x", 2.0),
            (0, "a", "y", 1.0),
            (0, "b", "y", 2.0),
            (1, "a", "x", 1.0),
            (1, "b", "x", 2.0),
            (1, "a", "y", 3.0),
            (1, "b", "y", 2.0),
        )
    ]
    assert ot.slower_on_every_link(rows, "a", "b") == [0]
    assert ot.slower_on_every_link(rows, "b", "a") == []
