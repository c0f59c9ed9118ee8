"""Parity of sage_core's Qwen3OmniThinker with transformers' reference, in float32."""

import pytest
import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as transformers_omni
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeTextConfig,
)

from sage_core.model.config import parse_config
from sage_core.model.thinker import Qwen3OmniThinker

TOL = 1e-4

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
    rope_scaling={"mrope_section": [2, 3, 3], "interleaved": True, "rope_type": "default"},
)

CONFIGS = {
    "base": {},
    "one_kv_head": dict(num_key_value_heads=1),
    "no_renorm": dict(norm_topk_prob=False),
    # head_dim 24 != hidden / heads = 16, and an M-RoPE section that sums to 12
    "wide_head": dict(
        head_dim=24,
        rope_scaling={"mrope_section": [4, 4, 4], "interleaved": True, "rope_type": "default"},
    ),
    "top1": dict(num_experts_per_tok=1),
    "top3": dict(num_experts_per_tok=3, num_key_value_heads=4),
    "dense_layer": dict(mlp_only_layers=[1]),
    "sparse_step_2": dict(decoder_sparse_step=2, num_hidden_layers=4),
}


def build_pair(overrides, seed=0, layer_indices=None):
    """A random transformers ThinkerTextModel (+ random lm head) and our model with the
    same weights; the reference keeps only `layer_indices` when given."""
    kw = dict(BASE, **overrides)
    torch.manual_seed(seed)
    hf_config = Qwen3OmniMoeTextConfig(**kw)
    hf_config._attn_implementation = "eager"
    ref = transformers_omni.Qwen3OmniMoeThinkerTextModel(hf_config).eval()
    with torch.no_grad():
        # Large enough weights that routing, norms and attention all matter.
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    lm_head = 0.2 * torch.randn(kw["vocab_size"], kw["hidden_size"])
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}
    state["lm_head.weight"] = lm_head

    cfg = parse_config(dict(kw, model_type="qwen3_omni_moe_text"))
    ours = Qwen3OmniThinker(cfg, layer_indices=layer_indices)
    if layer_indices is not None:
        keep = {f"model.layers.{i}." for i in layer_indices}
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)
        }
        ref.layers = torch.nn.ModuleList([ref.layers[i] for i in layer_indices])
    ours.load_state_dict(state, strict=True)
    return ref, lm_head, ours


def distinct_positions(batch, seq):
    """(3, B, S) position ids whose temporal, height and width rows all differ."""
    t = torch.arange(seq)
    rows = torch.stack([t, 2 * t + 1, (3 * t) % 7 + t])
    return rows[:, None, :].expand(3, batch, seq).contiguous()


def reference_outputs(ref, lm_head, ids, position_ids=None):
    with torch.no_grad():
        hidden = ref(input_ids=ids, position_ids=position_ids).last_hidden_state
    return hidden, hidden @ lm_head.T


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_hidden_states_match_transformers(name):
    ref, lm_head, ours = build_pair(CONFIGS[name])
    ids = torch.randint(0, BASE["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    hidden_ref, logits_ref = reference_outputs(ref, lm_head, ids)
    with torch.no_grad():
        hidden, logits = ours.hidden_states(ids), ours(ids)
    assert logits.shape == (2, 11, BASE["vocab_size"])
    assert hidden.dtype == logits.dtype == torch.float32
    # The comparison means something only if the outputs are far from zero.
    assert logits_ref.abs().max() > 1
    torch.testing.assert_close(hidden, hidden_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, logits_ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["base", "wide_head"])
def test_three_row_position_ids_match_transformers(name):
    ref, lm_head, ours = build_pair(CONFIGS[name], seed=3)
    ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    pos = distinct_positions(2, 9)
    hidden_ref, logits_ref = reference_outputs(ref, lm_head, ids, pos)
    with torch.no_grad():
        logits = ours(ids, position_ids=pos)
        torch.testing.assert_close(ours.hidden_states(ids, pos), hidden_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(logits, logits_ref, atol=TOL, rtol=0)
    # The rows really differ in effect: text positions (equal rows) give other logits.
    with torch.no_grad():
        assert (ours(ids) - logits).abs().max() > 1e-2


def test_two_dim_position_ids_equal_their_three_row_broadcast():
    _, _, ours = build_pair({})
    ids = torch.randint(0, BASE["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([[3, 4, 5, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pos), ours(ids, pos[None].expand(3, 1, 7)))


@pytest.mark.parametrize("layers", [[0, 2], [1], [0, 1, 3]])
def test_selective_layers_match_reference_with_cut_layer_list(layers):
    ref, lm_head, ours = build_pair(dict(num_hidden_layers=4, mlp_only_layers=[1]), 5, layers)
    assert ours.layer_indices == layers
    assert list(ours.model.layers.keys()) == [str(i) for i in layers]
    ids = torch.randint(0, BASE["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6))
    hidden_ref, logits_ref = reference_outputs(ref, lm_head, ids, distinct_positions(2, 8))
    with torch.no_grad():
        logits = ours(ids, distinct_positions(2, 8))
    torch.testing.assert_close(logits, logits_ref, atol=TOL, rtol=0)


def test_state_dict_keys_are_the_checkpoint_keys():
    ref, _, ours = build_pair(CONFIGS["dense_layer"])
    expected = {f"model.{k}" for k in ref.state_dict()} | {"lm_head.weight"}
    assert set(ours.state_dict()) == expected
    assert ours.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert ours.state_dict()["model.layers.0.mlp.experts.down_proj"].shape == (8, 64, 32)
    assert "model.layers.1.mlp.gate_proj.weight" in ours.state_dict()
    # The RoPE table is a non-persistent buffer: never read from or written to a checkpoint.
    assert not any("inv_freq" in k for k in ours.state_dict())


def test_builds_on_meta_and_loads_with_assign():
    ref, lm_head, reference_model = build_pair({})
    with torch.device("meta"):
        model = Qwen3OmniThinker(reference_model.config)
    assert model.model.embed_tokens.weight.is_meta
    model.load_state_dict(reference_model.state_dict(), strict=True, assign=True)
    model.model.rotary_emb.reset_buffers("cpu")
    ids = torch.randint(0, BASE["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_model(ids), atol=0, rtol=0)


def test_float64_rope_buffer_does_not_change_compute_dtype():
    # Bug #1 of the report: a float64 inv_freq assigned from a checkpoint.
    _, _, model = build_pair({})
    ids = torch.randint(0, BASE["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(ids)
        model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.double()
        got = model(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_to_bfloat16_keeps_rope_table_float32():
    _, _, model = build_pair({})
    model = model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_model_without_lm_head_serves_hidden_states_only():
    _, _, full = build_pair({})
    bare = Qwen3OmniThinker(full.config, with_lm_head=False)
    state = {k: v for k, v in full.state_dict().items() if k != "lm_head.weight"}
    bare.load_state_dict(state, strict=True)
    assert bare.lm_head is None
    ids = torch.randint(0, BASE["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(bare.hidden_states(ids), full.hidden_states(ids))
    with pytest.raises(ValueError, match="lm_head"):
        bare(ids)


@pytest.mark.parametrize(
    "layers, match",
    [
        ([0, 3], "out of range"),
        ([-1], "out of range"),
        ([1, 1], "duplicates"),
        ([], "empty"),
        (["0"], "ints"),
    ],
)
def test_bad_layer_indices_are_value_errors(layers, match):
    cfg = parse_config(dict(BASE, model_type="qwen3_omni_moe_text"))
    with pytest.raises(ValueError, match=match):
        Qwen3OmniThinker(cfg, layer_indices=layers)


def test_bad_inputs_are_value_errors_naming_the_argument():
    _, _, model = build_pair({})
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 3), BASE["vocab_size"]))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 5, dtype=torch.long), position_ids=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 5, dtype=torch.long), position_ids=torch.zeros(4, 1, 5))
