"""The decode timeline (sage_core.offload.timeline), checked against layouts worked by hand."""

import numpy as np
import pytest

from sage_core.offload.timeline import decode_timeline, layer_reads


def test_without_transfers_a_token_is_its_compute():
    out = decode_timeline(np.zeros((3, 4)), np.zeros((3, 4)), 0.5, 1.5, 9.0)
    assert out["token_s"].tolist() == [8.0, 8.0, 8.0]
    assert out["stall_s"] == 0 and out["link_busy_s"] == 0 and out["compute_s"] == 24.0


def test_demand_reads_never_overlap_their_own_layer():
    demand = np.array([[2, 0, 1], [0, 3, 0]])
    out = decode_timeline(demand, np.zeros_like(demand), 1.0, 1.0, 0.5)
    # every read waits: compute 6 s per token plus 1.5 s of transfers, then 1.5 s
    assert out["token_s"].tolist() == [7.5, 7.5]
    assert out["stall_s"] == out["link_busy_s"] == 3.0


def test_a_read_ahead_hides_behind_the_layer_that_requests_it():
    # layer 0's router requests 1 expert for layer 1 (1 s), under layer 0's 1 s of experts
    # and layer 1's attention: nothing waits
    out = decode_timeline([[0, 0]], [[0, 1]], 1.0, 1.0, 1.0)
    assert out["token_s"].tolist() == [4.0] and out["stall_s"] == 0
    # 3 experts (3 s) do not fit under the 2 s before layer 1 needs them: 1 s of stall
    out = decode_timeline([[0, 0]], [[0, 3]], 1.0, 1.0, 1.0)
    assert out["token_s"].tolist() == [5.0] and out["stall_s"] == 1.0
    kinds = [(kind, start, end) for _, _, kind, start, end in out["events"]]
    assert ("ahead", 1.0, 4.0) in kinds and ("stall", 3.0, 4.0) in kinds


def test_the_link_is_first_come_first_served():
    # layer 0 reads 2 experts ahead for layer 1 (link busy 1 -> 3); layer 1's own miss,
    # requested at 2, waits for them and arrives at 4
    out = decode_timeline([[0, 1]], [[0, 2]], 1.0, 0.0, 1.0)
    assert out["token_s"].tolist() == [4.0]
    assert out["stall_s"] == 2.0 and out["link_busy_s"] == 3.0
    demand = [e for e in out["events"] if e[2] == "demand"]
    assert demand == [(0, 1, "demand", 3.0, 4.0)]


@pytest.mark.parametrize(
    ("demand", "ahead", "match"),
    [
        (np.zeros(3), np.zeros(3), "demand"),
        (np.zeros((2, 2)), np.zeros((2, 3)), "demand"),
        (-np.ones((1, 2)), np.zeros((1, 2)), ">= 0"),
        (np.zeros((1, 2)), np.ones((1, 2)), r"ahead\[:, 0\]"),
    ],
)
def test_bad_inputs_are_named(demand, ahead, match):
    with pytest.raises(ValueError, match=match):
        decode_timeline(demand, ahead, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="transfer_s"):
        decode_timeline(np.zeros((1, 2)), np.zeros((1, 2)), 1.0, 1.0, float("nan"))


def test_layer_reads_count_misses_and_read_aheads_per_token_and_layer():
    from sage_core.offload import cache_policy
    from sage_core.offload.expert_trace import RoutingTrace, access_sequence, prefetch_plan

    experts = np.array([[[0, 1], [2, 3]], [[0, 1], [2, 4]], [[5, 1], [2, 3]]])  # (3, 2, 2)
    predicted = np.array([[[-1, -1], [2, 4]], [[-1, -1], [2, 4]], [[-1, -1], [3, 0]]])
    trace = RoutingTrace(experts, predicted, np.arange(3), np.array([0, 1]), num_experts=6)
    keys, _ = access_sequence(trace)
    sim = cache_policy.simulate(
        keys, cache_policy.make_policy("lru", 8), prefetch=prefetch_plan(trace)
    )
    demand, ahead = layer_reads(trace, sim)
    # token 0: layer 0 misses 0, 1; layer 1 reads 2, 4 ahead, then misses 3
    # token 1: all resident; token 2: layer 0 misses 5, layer 1 reads (1, 3) ahead... 3 is
    # resident, (1, 0) is read ahead; 2 and 3 hit
    assert demand.tolist() == [[2, 1], [0, 0], [1, 0]]
    assert ahead.tolist() == [[0, 2], [0, 0], [0, 1]]
    assert int(demand.sum() + ahead.sum()) == sim.experts_read
    with pytest.raises(ValueError, match="token by token"):
        layer_reads(trace, cache_policy.simulate(keys[:4], cache_policy.make_policy("lru", 8)))
