"""load_thinker against the oracle: transformers' Qwen3OmniMoeThinkerTextModel.

Tiny random reference models are written in the real checkpoint layouts with
save_thinker_checkpoint, loaded with load_thinker, and must give the reference's hidden
states and logits to 1e-4 in float32.
"""

import pytest
import torch
from checkpoints import foreign_tensors
from torch import nn
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeTextConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerTextModel,
)

from sage_core.checkpoint import load_thinker, save_thinker_checkpoint
from sage_core.model.config import parse_config

ATOL = 1e-4
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
)
CASES = {
    "gqa_top2": dict(mrope_section=[3, 3, 2]),
    "kv1_top1_unnormalised_wide_heads": dict(
        num_key_value_heads=1,
        head_dim=24,  # != hidden / heads = 16
        num_experts_per_tok=1,
        norm_topk_prob=False,
        mrope_section=[4, 4, 4],
    ),
    "top3_dense_middle_layer": dict(
        num_experts_per_tok=3, mlp_only_layers=[1], mrope_section=[4, 2, 2]
    ),
}


class Reference:
    """A random transformers thinker text model plus a random lm head."""

    def __init__(self, seed: int, **overrides):
        settings = {**BASE, **overrides}
        section = settings.pop("mrope_section")
        hf_config = Qwen3OmniMoeTextConfig(
            **settings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000.0,
                "mrope_section": section,
                "interleaved": True,
            },
        )
        hf_config._attn_implementation = "eager"
        self.config = parse_config(hf_config.to_dict(), source="transformers config")
        gen = torch.Generator().manual_seed(seed)
        self.model = Qwen3OmniMoeThinkerTextModel(hf_config).eval()
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                noise = torch.randn(param.shape, generator=gen)
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * noise)
                elif name.endswith("mlp.gate.weight"):
                    param.copy_(noise)  # decisive routing, far from top-k ties
                else:
                    param.copy_(0.15 * noise)
        self.lm_head = 0.15 * torch.randn(
            self.config.vocab_size, self.config.hidden_size, generator=gen
        )

    def state_dict(self) -> dict:
        """In sage_core's key space: the checkpoint keys without `thinker.`."""
        state = {"model." + k: v for k, v in self.model.state_dict().items()}
        state["lm_head.weight"] = self.lm_head
        return state

    @torch.no_grad()
    def outputs(self, input_ids, position_ids=None, layers=None):
        """(hidden states after the final norm, logits), optionally with the layer list cut."""
        full = self.model.layers
        if layers is not None:
            self.model.layers = nn.ModuleList([full[i] for i in layers])
        try:
            hidden = self.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        finally:
            self.model.layers = full
        return hidden, hidden @ self.lm_head.T


def inputs(seed=0, batch=2, seq=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BASE["vocab_size"], (batch, seq), generator=gen)
    # Three different rows (temporal, height, width), so the M-RoPE interleave matters.
    positions = torch.stack(
        [
            torch.arange(seq).expand(batch, seq),
            torch.randint(0, 40, (batch, seq), generator=gen),
            torch.randint(0, 40, (batch, seq), generator=gen),
        ]
    )
    return ids, positions


@pytest.fixture(scope="module")
def references():
    return {name: Reference(seed, **CASES[name]) for seed, name in enumerate(CASES)}


def assert_parity(model, ref, ids, positions, layers=None):
    with torch.no_grad():
        want_hidden, want_logits = ref.outputs(ids, positions, layers)
        torch.testing.assert_close(
            model.hidden_states(ids, position_ids=positions), want_hidden, rtol=0, atol=ATOL
        )
        torch.testing.assert_close(
            model(ids, position_ids=positions), want_logits, rtol=0, atol=ATOL
        )


@pytest.mark.parametrize("case", list(CASES))
def test_real_layout_sharded_per_expert_with_foreign_keys(references, tmp_path, case):
    ref = references[case]
    save_thinker_checkpoint(
        ref.state_dict(), ref.config, tmp_path, num_shards=3, extra_tensors=foreign_tensors()
    )
    assert (tmp_path / "model-00003-of-00003.safetensors").is_file()
    model = load_thinker(tmp_path)
    assert model.expert_cache is None
    ids, positions = inputs()
    assert_parity(model, ref, ids, positions)  # (3, B, S) with differing rows
    assert_parity(model, ref, ids, positions[0])  # (B, S)
    assert_parity(model, ref, ids, None)  # default positions


def test_fused_expert_layout(references, tmp_path):
    ref = references["gqa_top2"]
    save_thinker_checkpoint(ref.state_dict(), ref.config, tmp_path, experts="fused")
    ids, positions = inputs(1)
    assert_parity(load_thinker(tmp_path), ref, ids, positions)


def test_thinker_only_layout_single_file(references, tmp_path):
    ref = references["kv1_top1_unnormalised_wide_heads"]
    save_thinker_checkpoint(
        ref.state_dict(), ref.config, tmp_path, layout="thinker_only", num_shards=1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ids, positions = inputs(2)
    assert_parity(load_thinker(tmp_path), ref, ids, positions)


def test_bare_text_layout_serves_hidden_states_only(references, tmp_path):
    ref = references["top3_dense_middle_layer"]
    save_thinker_checkpoint(ref.state_dict(), ref.config, tmp_path, layout="text")
    model = load_thinker(tmp_path)
    assert model.lm_head is None
    ids, positions = inputs(3)
    want_hidden, _ = ref.outputs(ids, positions)
    with torch.no_grad():
        got = model.hidden_states(ids, position_ids=positions)
    torch.testing.assert_close(got, want_hidden, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="lm_head"):
        model(ids)


@pytest.mark.parametrize("layers", [[0, 2], 2, [1], [2]])
def test_selective_layers_match_the_cut_reference(references, tmp_path, layers):
    ref = references["top3_dense_middle_layer"]  # layer 1 is dense, 0 and 2 sparse
    save_thinker_checkpoint(ref.state_dict(), ref.config, tmp_path)
    model = load_thinker(tmp_path, layers=layers)
    kept = list(range(layers)) if isinstance(layers, int) else layers
    assert model.layer_indices == kept
    ids, positions = inputs(4)
    assert_parity(model, ref, ids, positions, layers=kept)


def used_experts(trace) -> int:
    """Distinct (layer, expert) pairs requested by one forward pass."""
    return sum(len(torch.unique(calls[-1][0])) for calls in trace.values())


@pytest.mark.parametrize("bound", [1, 2])
def test_on_demand_experts_below_top_k(references, tmp_path, bound):
    ref = references["top3_dense_middle_layer"]  # top-3, so a bound of 1 or 2 is below k
    save_thinker_checkpoint(ref.state_dict(), ref.config, tmp_path, extra_tensors=foreign_tensors())
    model = load_thinker(tmp_path, max_resident_experts=bound)
    ids, positions = inputs(5)
    with model.routing_trace() as trace:
        assert_parity(model, ref, ids, positions)  # two forward passes (hidden, logits)
    stats = model.expert_cache.stats()
    assert stats["capacity"] == bound
    assert stats["peak_resident"] <= bound and stats["resident"] <= bound
    # Each pass asks each used expert once; a cache this small cannot serve a repeat.
    per_pass = used_experts(trace)
    assert per_pass > bound
    assert stats["misses"] == 2 * per_pass and stats["hits"] == 0
    assert stats["evictions"] == stats["misses"] - stats["resident"]
    one_expert = 3 * ref.config.hidden_size * ref.config.moe_intermediate_size * 4
    assert stats["bytes_read"] == stats["misses"] * one_expert


def test_on_demand_cache_large_enough_hits_on_reuse(references, tmp_path):
    ref = references["gqa_top2"]
    save_thinker_checkpoint(ref.state_dict(), ref.config, tmp_path, experts="fused")
    all_experts = ref.config.num_hidden_layers * ref.config.num_experts
    model = load_thinker(tmp_path, max_resident_experts=all_experts)
    ids, positions = inputs(6)
    with model.routing_trace() as trace:
        assert_parity(model, ref, ids, positions)
    stats = model.expert_cache.stats()
    per_pass = used_experts(trace)
    assert (stats["misses"], stats["hits"], stats["evictions"]) == (per_pass, per_pass, 0)
    assert stats["peak_resident"] == per_pass <= all_experts
