"""The multi-token expert path through torch._grouped_mm against the per-expert loop."""

import pytest
import torch
from torch import nn

from sage_core.model import moe
from sage_core.model.moe import (
    ResidentExperts,
    grouped_expert_mix,
    grouped_mm_expert_mix,
    grouped_mm_usable,
)
from sage_core.model.thinker import Qwen3OmniThinker
from tests.test_moe import CONFIG, E, H, naive_mix, random_choice, random_experts

pytestmark = pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm"
)


def edge_choice(T, k):
    """Every token picks expert 0 and expert E-1 first (the first and the last group),
    then others; experts 1 and 2 stay unused (empty groups between used ones)."""
    g = torch.Generator().manual_seed(T)
    rest = torch.stack([3 + torch.randperm(E - 4, generator=g)[: k - 2] for _ in range(T)])
    indices = torch.cat([torch.full((T, 1), 0), torch.full((T, 1), E - 1), rest], dim=1)
    return indices, torch.rand(T, k, generator=g)


@pytest.mark.parametrize("T, k", [(2, 1), (7, 2), (40, 3), (5, 8), (64, 4)])
def test_grouped_mm_equals_the_per_expert_loop(T, k):
    experts = random_experts()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    indices, weights = random_choice(T, k, seed=k)
    with torch.no_grad():
        assert grouped_mm_usable(x, experts)
        out = grouped_mm_expert_mix(x, indices, weights, experts)
        # Same sorted rows, same per-expert products, same scatter: the same bits.
        torch.testing.assert_close(out, grouped_expert_mix(x, indices, weights, experts))
        torch.testing.assert_close(out, naive_mix(x, indices, weights, experts))
    assert out.abs().max() > 0.1


@pytest.mark.parametrize("T, k", [(3, 2), (33, 4)])
def test_grouped_mm_with_first_last_and_unused_experts(T, k):
    """Group boundaries at both ends and empty groups in between: an offset off by one
    row gives a row to the wrong expert, and these outputs differ."""
    experts = random_experts(seed=1)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(100 + T))
    indices, weights = edge_choice(T, k)
    with torch.no_grad():
        out = grouped_mm_expert_mix(x, indices, weights, experts)
        torch.testing.assert_close(out, naive_mix(x, indices, weights, experts))


def test_grouped_mm_in_bfloat16_stays_bfloat16():
    experts = random_experts(dtype=torch.bfloat16)
    x = torch.randn(6, H, dtype=torch.bfloat16)
    indices, weights = random_choice(6, 2, seed=1)
    with torch.no_grad():
        assert grouped_mm_usable(x, experts)
        out = grouped_mm_expert_mix(x, indices, weights.bfloat16(), experts)
        loop = grouped_expert_mix(x, indices, weights.bfloat16(), experts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, loop)


def test_grouped_mm_is_not_used_where_it_cannot_run(monkeypatch):
    experts = random_experts()
    x = torch.randn(4, H)
    with torch.no_grad():
        assert grouped_mm_usable(x, experts)
        assert not grouped_mm_usable(x.double(), experts.double())  # no float64 kernel
        # Rows of 6 floats (24 bytes): the kernel wants strides in multiples of 16 bytes.
        assert not grouped_mm_usable(torch.randn(4, 6), ResidentExperts(E, 6, 4))
        assert not grouped_mm_usable(x, nn.Module())  # an on-demand provider
        monkeypatch.setattr(moe, "GROUPED_MM_DEVICES", ())
        assert not grouped_mm_usable(x, experts)
        monkeypatch.undo()
        monkeypatch.delattr(torch, "_grouped_mm")
        assert not grouped_mm_usable(x, experts)
    assert not grouped_mm_usable(x, experts)  # autograd: no CPU backward


def block_with_recorded_paths(monkeypatch, hidden=H, experts=None):
    """A sparse block whose forward records which multi-token expert path ran."""
    block = moe.SparseMoeBlock(CONFIG, layer_idx=0)
    block.gate = nn.Linear(hidden, E, bias=False)
    block.experts = experts if experts is not None else random_experts()
    ran = []
    for name in ("grouped_expert_mix", "grouped_mm_expert_mix"):
        mix = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _mix=mix: ran.append(_n) or _mix(*a))
    return block, ran


def test_the_block_takes_grouped_mm_for_a_prefill_and_the_loop_otherwise(monkeypatch):
    block, ran = block_with_recorded_paths(monkeypatch)
    x = torch.randn(1, 9, H, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        fast, _ = block(x)
    assert ran == ["grouped_mm_expert_mix"]
    trained, _ = block(x)  # autograd: the loop, which has a backward
    assert ran[-1] == "grouped_expert_mix"
    torch.testing.assert_close(trained.detach(), fast)
    trained.sum().backward()
    assert block.experts.down_proj.grad.abs().max() > 0
    odd = ResidentExperts(E, 6, 4)
    nn.init.normal_(odd.gate_up_proj)
    nn.init.normal_(odd.down_proj)
    block, ran = block_with_recorded_paths(monkeypatch, hidden=6, experts=odd)
    with torch.no_grad():
        block(torch.randn(1, 5, 6))
    assert ran == ["grouped_expert_mix"]


def test_model_logits_are_the_same_with_grouped_mm_and_with_the_loop(monkeypatch):
    torch.manual_seed(0)
    model = Qwen3OmniThinker(CONFIG)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grouped = model(ids)
        monkeypatch.setattr(moe, "GROUPED_MM_DEVICES", ())
        loop = model(ids)
    assert grouped.abs().max() > 1
    torch.testing.assert_close(grouped, loop, rtol=0, atol=0)
