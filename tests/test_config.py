"""Reading real Qwen3-Omni config.json files in every layout."""

import copy
import dataclasses
import json

import pytest
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as conf

from sage_core.errors import CheckpointError
from sage_core.model.config import (
    ThinkerTextConfig,
    nested_config_dict,
    parse_config,
    read_config,
)

# The text part of Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json, as published with the checkpoint.
REAL_TEXT = {
    "model_type": "qwen3_omni_moe_text",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 768,
    "max_position_embeddings": 65536,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 1000000,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
REAL_NESTED = {
    "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
    "model_type": "qwen3_omni_moe",
    "enable_audio_output": True,
    "talker_config": {"model_type": "qwen3_omni_moe_talker", "text_config": {"hidden_size": 1024}},
    "code2wav_config": {"codebook_size": 2048},
    "thinker_config": {
        "model_type": "qwen3_omni_moe_thinker",
        "audio_config": {"d_model": 1280},
        "vision_config": {"hidden_size": 1152},
        "audio_token_id": 151675,
        "text_config": REAL_TEXT,
    },
}


def test_real_nested_config_parses_to_the_design_values():
    cfg = parse_config(copy.deepcopy(REAL_NESTED))
    assert cfg.hidden_size == 2048 and cfg.num_hidden_layers == 48
    assert cfg.num_attention_heads == 32 and cfg.num_key_value_heads == 4
    assert cfg.head_dim == 128
    assert cfg.num_experts == 128 and cfg.num_experts_per_tok == 8
    assert cfg.moe_intermediate_size == 768 and cfg.norm_topk_prob is True
    assert cfg.vocab_size == 152064 and cfg.rms_norm_eps == 1e-6
    assert cfg.rope_theta == 1e6 and isinstance(cfg.rope_theta, float)
    assert cfg.mrope_section == (24, 20, 20) and cfg.mrope_interleaved is True
    assert cfg.decoder_sparse_step == 1 and cfg.mlp_only_layers == ()
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False
    assert all(cfg.is_sparse(i) for i in range(48))


def test_thinker_only_and_bare_forms_give_the_same_config():
    nested = parse_config(copy.deepcopy(REAL_NESTED))
    thinker_only = copy.deepcopy(REAL_NESTED["thinker_config"])
    assert parse_config(thinker_only) == nested
    assert parse_config(copy.deepcopy(REAL_TEXT)) == nested
    bare_without_type = {k: v for k, v in REAL_TEXT.items() if k != "model_type"}
    assert parse_config(bare_without_type) == nested


def test_rope_parameters_with_theta_inside_equals_rope_scaling_with_theta_on_top():
    newer = copy.deepcopy(REAL_TEXT)
    del newer["rope_scaling"], newer["rope_theta"]
    newer["rope_parameters"] = {
        "mrope_section": [24, 20, 20],
        "interleaved": True,
        "rope_type": "default",
        "rope_theta": 1000000.0,
    }
    assert parse_config(newer) == parse_config(copy.deepcopy(REAL_TEXT))
    # rope_parameters without theta inside, theta on top
    mixed = copy.deepcopy(newer)
    del mixed["rope_parameters"]["rope_theta"]
    mixed["rope_theta"] = 5e5
    assert parse_config(mixed).rope_theta == 5e5


def test_head_dim_defaults_to_hidden_over_heads_and_explicit_wins():
    text = dict(copy.deepcopy(REAL_TEXT), hidden_size=1024, num_attention_heads=16)
    del text["head_dim"]
    text["rope_scaling"]["mrope_section"] = [12, 10, 10]
    assert parse_config(text).head_dim == 64
    text["head_dim"] = 128
    text["rope_scaling"]["mrope_section"] = [24, 20, 20]
    assert parse_config(text).head_dim == 128


def test_dense_layers_and_sparse_step():
    text = dict(copy.deepcopy(REAL_TEXT), num_hidden_layers=6, mlp_only_layers=[4, 0])
    cfg = parse_config(text)
    assert cfg.mlp_only_layers == (0, 4)
    assert [cfg.is_sparse(i) for i in range(6)] == [False, True, True, True, False, True]
    cfg = parse_config(dict(text, mlp_only_layers=[], decoder_sparse_step=2))
    assert [cfg.is_sparse(i) for i in range(6)] == [False, True, False, True, False, True]
    no_dense_width = {k: v for k, v in text.items() if k != "intermediate_size"}
    with pytest.raises(CheckpointError, match="intermediate_size"):
        parse_config(no_dense_width)


@pytest.mark.parametrize(
    "field",
    [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "vocab_size",
        "rope_theta",
    ],
)
def test_missing_required_field_names_field_and_file(field):
    raw = copy.deepcopy(REAL_NESTED)
    del raw["thinker_config"]["text_config"][field]
    with pytest.raises(CheckpointError, match=rf"my/config\.json.*{field}"):
        parse_config(raw, source="my/config.json")


def test_missing_mrope_section_and_thinker_config_are_named():
    raw = copy.deepcopy(REAL_NESTED)
    del raw["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"]
    with pytest.raises(CheckpointError, match="mrope_section"):
        parse_config(raw)
    with pytest.raises(CheckpointError, match="thinker_config"):
        parse_config({"model_type": "qwen3_omni_moe"})
    with pytest.raises(CheckpointError, match="text_config"):
        parse_config({"model_type": "qwen3_omni_moe", "thinker_config": {"audio_config": {}}})


@pytest.mark.parametrize(
    "path, value",
    [(("model_type",), "llama"), (("thinker_config", "text_config", "model_type"), "qwen2_moe")],
)
def test_unknown_model_type_is_a_checkpoint_error(path, value):
    raw = copy.deepcopy(REAL_NESTED)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(CheckpointError, match=f"model_type.*{value}"):
        parse_config(raw)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hidden_size="2048"), "hidden_size"),
        (dict(num_key_value_heads=5), "num_key_value_heads"),
        (dict(head_dim=96), "mrope_section"),
        (dict(num_experts_per_tok=200), "num_experts_per_tok"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_scaling={"mrope_section": [24, 20, 20], "rope_type": "yarn"}), "rope_type"),
        (dict(rope_scaling={"mrope_section": [24, 20, 20], "interleaved": False}), "interleaved"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    ],
)
def test_inconsistent_or_unsupported_values_name_the_field(change, field):
    with pytest.raises(CheckpointError, match=field):
        parse_config(dict(copy.deepcopy(REAL_TEXT), **change))


def test_read_config_from_directory_or_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL_NESTED))
    assert read_config(tmp_path) == read_config(tmp_path / "config.json")
    assert read_config(str(tmp_path)).num_experts == 128


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        read_config(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        read_config(tmp_path)  # a directory without config.json
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "qwen3_omni_moe", ')
    with pytest.raises(CheckpointError, match=rf"{bad}.*invalid JSON"):
        read_config(tmp_path)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match=str(bad)):
        read_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=str(bad)):
        read_config(bad)
    text = {k: v for k, v in REAL_TEXT.items() if k != "vocab_size"}
    bad.write_text(json.dumps(text))
    with pytest.raises(CheckpointError, match=rf"{bad}.*vocab_size"):
        read_config(tmp_path)


def small_config(**overrides):
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        intermediate_size=48,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rope_theta=10_000.0,
        mrope_section=(4, 4, 4),
        mlp_only_layers=(1,),
    )
    return ThinkerTextConfig(**dict(fields, **overrides))


def test_nested_config_dict_round_trips_through_parse_and_json(tmp_path):
    cfg = small_config()
    raw = nested_config_dict(cfg)
    assert raw["model_type"] == "qwen3_omni_moe"
    assert raw["thinker_config"]["text_config"]["rope_scaling"]["interleaved"] is True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_config(tmp_path) == cfg
    assert parse_config(json.loads(json.dumps(nested_config_dict(parse_config(REAL_NESTED))))) == (
        parse_config(REAL_NESTED)
    )


def test_nested_config_dict_is_read_by_transformers():
    cfg = small_config()
    hf = conf.Qwen3OmniMoeConfig.from_dict(nested_config_dict(cfg))
    text = hf.thinker_config.text_config
    assert isinstance(text, conf.Qwen3OmniMoeTextConfig)
    assert (text.hidden_size, text.head_dim, text.num_key_value_heads) == (64, 24, 1)
    assert text.rope_parameters["mrope_section"] == [4, 4, 4]
    assert text.rope_parameters["rope_theta"] == 10_000.0
    assert list(text.mlp_only_layers) == [1] and text.norm_topk_prob is False
    # ... and what transformers writes back parses to the same config.
    assert parse_config(hf.to_dict()) == cfg


def test_config_hash_is_stable_and_sensitive():
    cfg = small_config()
    assert cfg.config_hash() == small_config().config_hash()
    assert len(cfg.config_hash()) == 64
    assert cfg.config_hash() != small_config(rope_theta=20_000.0).config_hash()
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert (
        ThinkerTextConfig(**{**cfg.to_dict(), "mrope_section": (4, 4, 4), "mlp_only_layers": (1,)})
        == cfg
    )


def test_each_field_is_one_key_of_the_written_file():
    """The dataclass is the only list of keys: the writer emits one key per field."""
    text = nested_config_dict(small_config())["thinker_config"]["text_config"]
    rope = text.pop("rope_scaling")
    assert text.pop("model_type") == "qwen3_omni_moe_text" and rope.pop("rope_type") == "default"
    names = {f.metadata.get("key", f.name) for f in dataclasses.fields(ThinkerTextConfig)}
    assert sorted([*text, *rope]) == sorted(names)
    assert len(text) + len(rope) == len(dataclasses.fields(ThinkerTextConfig))
