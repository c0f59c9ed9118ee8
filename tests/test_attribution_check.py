"""The estimator study's instruments (sage_core.studies.attribution_check): frozen routing
and the path-corrected estimates."""

import math

import pytest
import torch
from checkpoints import toy_config

from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.studies import attribution_check
from sage_core.studies.attribution_check import (
    FrozenRoutingAblation,
    _ablated_nll,
    _frozen_routing_nll,
    path_estimates,
)
from sage_core.trust import attribution_estimates

CONFIG = toy_config(vocab_size=64, num_hidden_layers=3)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen3OmniThinker(CONFIG).eval()


def window(seed=4, length=14):
    return torch.randint(
        0, CONFIG.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed)
    )


def served_cells(model, ids):
    est = attribution_estimates(model, ids, {})
    layers = sorted(model.sparse_blocks())
    return est, [(layers[li], e) for li, e in est["served"][0].nonzero().tolist()]


def test_frozen_routing_keeps_the_unablated_choices_whatever_the_router_says():
    k, S, E = 2, 5, 8
    g = torch.Generator().manual_seed(0)
    candidates = {0: torch.stack([torch.randperm(E, generator=g)[: k + 1] for _ in range(S)])}
    plan = [(0, int(candidates[0][2, 1])), (1, 3), (None, None)]
    selector = FrozenRoutingAblation(candidates, plan, k, norm_topk_prob=True)
    logits = torch.randn(len(plan) * S, E, generator=g)  # a router that disagrees
    indices, weights = selector(logits, 0, torch.zeros(len(plan) * S, 4))
    indices = indices.reshape(len(plan), S, k)
    chosen = candidates[0]
    # rows that remove nothing in this layer keep the recorded top-k exactly
    assert torch.equal(indices[1], chosen[:, :k]) and torch.equal(indices[2], chosen[:, :k])
    # the removing row hands the removed expert's slot to the next choice, where it served
    e = plan[0][1]
    want = torch.where(chosen[:, :k] == e, chosen[:, k:].expand(-1, k), chosen[:, :k])
    assert torch.equal(indices[0], want) and not torch.equal(want, chosen[:, :k])
    # weights: the live router's probabilities over those experts, renormalised
    probs = torch.softmax(logits, -1).reshape(len(plan), S, E)
    ref = probs.gather(2, indices)
    torch.testing.assert_close(weights.reshape(len(plan), S, k), ref / ref.sum(-1, keepdim=True))


def test_frozen_routing_equals_the_real_ablation_in_the_last_layer():
    # No later layer can flip: the frozen-routing harm is the ablation's, cell for cell.
    model = tiny_model()
    ids = window()
    est, served = served_cells(model, ids)
    last = max(model.sparse_blocks())
    cells = [cell for cell in served if cell[0] == last]
    assert cells
    frozen = _frozen_routing_nll(model, ids, est["candidates"], cells)
    live = _ablated_nll(model, ids, [{layer: [e]} for layer, e in cells])
    torch.testing.assert_close(frozen, live, atol=1e-6, rtol=0)


def test_path_estimates_run_from_the_first_order_estimate_to_the_frozen_routing_truth():
    model = tiny_model()
    with torch.no_grad():  # large expert outputs: removals far outside the linear regime
        for block in model.sparse_blocks().values():
            block.experts.down_proj.mul_(6.0)
    ids = window()
    est, served = served_cells(model, ids)
    layers = sorted(model.sparse_blocks())
    first = path_estimates(model, ids, served, (0.0,))
    want = torch.tensor([float(est["harm"][0, layers.index(layer), e]) for layer, e in served])
    torch.testing.assert_close(first, want.double(), atol=1e-6, rtol=1e-4)
    # Integrated gradients with many steps is the integral of the gradient along the
    # removal: the exact harm of a removal that leaves later layers' routing as it was.
    truth = float(est["nll"][0]) - _frozen_routing_nll(model, ids, est["candidates"], served)
    steps = tuple((i + 0.5) / 16 for i in range(16))
    ig = path_estimates(model, ids, served, steps)
    scale = float(truth.abs().max())
    assert scale > 1e-3
    assert float((ig - truth).abs().max()) <= 0.002 * scale  # first order misses by far more
    assert float((ig - truth).abs().mean()) < float((first - truth).abs().mean())


def test_summary_of_path_corrections_and_frozen_routing_by_hand():
    cells = [
        {
            "seed": 0,
            "window": 0,
            "context": "code",
            "layer": 0,
            "expert": expert,
            "broken": b,
            "estimate": est,
            "truth": true,
            "truth_frozen_routing": smooth,
            "estimate_ig": ig,
            "estimate_midpoint": mid,
        }
        for expert, (b, est, true, smooth, ig, mid) in enumerate(
            (
                (True, 0.3, 0.2, 0.25, 0.21, 0.3),
                (True, -0.1, 0.1, -0.05, 0.09, 0.1),
                (False, 0.2, -0.1, 0.1, -0.12, 0.2),
                (False, -0.2, -0.3, -0.2, -0.31, -0.2),
            )
        )
    ]
    s = attribution_check.summary(cells)
    assert s["spearman"] == pytest.approx(0.8)
    assert s["spearman_vs_frozen_routing"] == pytest.approx(1.0)
    assert s["spearman_frozen_routing_vs_truth"] == pytest.approx(0.8)
    assert s["sign_right_on_broken_vs_frozen_routing"] == 1.0
    assert s["estimate_ig_spearman"] == pytest.approx(1.0)
    assert s["estimate_ig_sign_right_on_broken"] == 1.0
    assert s["estimate_midpoint_sign_right_on_broken"] == 1.0
    assert s["sign_right_on_broken"] == 0.5 and s["broken_called_harmful"] == 0.5
    assert s["cells"] == 4 and s["broken_cells"] == 2
    assert s["broken_share_of_top2"] == 0.5  # top 2 by estimate: 0.3 (broken), 0.2 (healthy)


def test_within_cell_correlation_by_hand():
    def cell(context, expert, window, estimate, truth):
        return (
            {"seed": 0, "context": context, "layer": 1, "expert": expert},
            window,
            estimate,
            truth,
        )

    rows = [
        cell("code", 0, 0, 0.1, 0.0),
        cell("code", 0, 1, 0.3, 0.4),  # cell means removed: (-0.1, 0.1) vs (-0.2, 0.2)
        cell("text", 5, 0, 11.0, 0.0),
        cell("text", 5, 1, 10.0, 0.2),  # (0.5, -0.5) vs (-0.1, 0.1)
        cell("code", 7, 0, 9.0, -9.0),  # expert 7: one window per context, no pair
        cell("text", 7, 1, -9.0, 9.0),
    ]
    cells = [{**c, "window": w, "estimate": e, "truth": t} for c, w, e, t in rows]
    # sum g t = -0.06, sum g^2 = 0.52, sum t^2 = 0.10
    assert attribution_check.within_cell_correlation(cells) == pytest.approx(
        -0.06 / math.sqrt(0.052)
    )
    assert math.isnan(attribution_check.within_cell_correlation(cells[4:]))


def test_cost_row_by_hand():
    row = attribution_check.cost_row(48, 128, 8, 63)
    assert row["cells"] == 6144 and row["attribution"] == 3
    assert row["ablation"] == pytest.approx(6144 * (1 - (1 - 8 / 128) ** 63))
