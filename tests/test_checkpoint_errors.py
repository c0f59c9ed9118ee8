"""Every broken checkpoint is a CheckpointError naming the file, the key and the shapes."""

import dataclasses
import json
import re

import pytest
import torch
from checkpoints import foreign_tensors
from safetensors.torch import load_file, save_file

from sage_core.checkpoint import load_thinker, save_thinker_checkpoint
from sage_core.errors import CheckpointError
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.thinker import Qwen3OmniThinker

CFG = ThinkerTextConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=0,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    mrope_section=(3, 3, 2),
)
INDEX = "model.safetensors.index.json"
UP_KEY = "thinker.model.layers.1.mlp.experts.3.up_proj.weight"
IDS = torch.arange(12).reshape(2, 6)


def write(directory, cfg=CFG, **kwargs):
    model = Qwen3OmniThinker(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    kwargs.setdefault("extra_tensors", foreign_tensors())
    return save_thinker_checkpoint(model.state_dict(), cfg, directory, **kwargs)


@pytest.fixture
def ckpt(tmp_path):
    return write(tmp_path / "ckpt")


def shard_of(directory, key):
    return json.loads((directory / INDEX).read_text())["weight_map"][key]


def edit_shard(directory, key, edit):
    """Rewrite the shard holding `key` with `edit(tensors)` applied."""
    path = directory / shard_of(directory, key)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, {"format": "pt"})
    return path


def edit_index(directory, edit):
    index = json.loads((directory / INDEX).read_text())
    edit(index["weight_map"])
    (directory / INDEX).write_text(json.dumps(index))


def raises(*parts):
    """pytest.raises(CheckpointError) whose message holds every literal part, in order."""
    return pytest.raises(CheckpointError, match=".*".join(re.escape(str(p)) for p in parts))


# --- directory and config ----------------------------------------------------------------


def test_missing_directory(tmp_path):
    with raises(tmp_path / "absent", "does not exist"):
        load_thinker(tmp_path / "absent")


def test_path_that_is_a_file(ckpt):
    with raises(ckpt / "config.json", "not a directory"):
        load_thinker(ckpt / "config.json")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with raises(ckpt / "config.json", "not found"):
        load_thinker(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with raises(ckpt / "config.json", "invalid JSON"):
        load_thinker(ckpt)


def test_config_missing_a_field(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["thinker_config"]["text_config"]["num_experts"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with raises(ckpt / "config.json", "'num_experts'"):
        load_thinker(ckpt)


# --- index and shards ----------------------------------------------------------------------


def test_no_weights_at_all(ckpt):
    for path in ckpt.glob("model*"):
        path.unlink()
    with raises(ckpt, INDEX, "model.safetensors"):
        load_thinker(ckpt)


def test_invalid_index(ckpt):
    (ckpt / INDEX).write_text("[1, 2")
    with raises(ckpt / INDEX, "cannot read index"):
        load_thinker(ckpt)


def test_index_without_weight_map(ckpt):
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}}))
    with raises(ckpt / INDEX, "weight_map"):
        load_thinker(ckpt)


def test_index_with_a_path_instead_of_a_shard_name(ckpt):
    edit_index(ckpt, lambda wm: wm.update({UP_KEY: "../elsewhere.safetensors"}))
    with raises(ckpt / INDEX, UP_KEY, "not a file name"):
        load_thinker(ckpt)


def test_index_points_to_a_missing_shard(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with raises(ckpt / "model-00002-of-00002.safetensors", "missing", "needed for key"):
        load_thinker(ckpt)


@pytest.mark.parametrize("keep", [5, 1000, -100])
def test_truncated_shard(ckpt, keep):
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with raises(shard, "truncated or corrupt"):
        load_thinker(ckpt)


def test_truncated_single_file(tmp_path):
    write(tmp_path, num_shards=1)
    single = tmp_path / "model.safetensors"
    single.write_bytes(single.read_bytes()[:-1])
    with raises(single, "truncated or corrupt"):
        load_thinker(tmp_path)


# --- keys, shapes, dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("bound", [None, 2])
def test_expert_key_missing_from_index_and_file(ckpt, bound):
    edit_shard(ckpt, UP_KEY, lambda t: t.pop(UP_KEY))
    edit_index(ckpt, lambda wm: wm.pop(UP_KEY))
    # Even with experts loaded on demand, the missing one is found at load time.
    with raises(ckpt / INDEX, "missing key", UP_KEY):
        load_thinker(ckpt, max_resident_experts=bound)


def test_key_listed_in_index_but_absent_from_its_shard(ckpt):
    shard = edit_shard(ckpt, UP_KEY, lambda t: t.pop(UP_KEY))
    with raises(shard, UP_KEY, "is not in this file"):
        load_thinker(ckpt)


def test_missing_key_of_an_unselected_layer_is_fine(ckpt):
    edit_shard(ckpt, UP_KEY, lambda t: t.pop(UP_KEY))
    edit_index(ckpt, lambda wm: wm.pop(UP_KEY))
    assert load_thinker(ckpt, layers=[0]).layer_indices == [0]


def test_missing_norm(ckpt):
    key = "thinker.model.norm.weight"
    edit_shard(ckpt, key, lambda t: t.pop(key))
    edit_index(ckpt, lambda wm: wm.pop(key))
    with raises("missing key", key):
        load_thinker(ckpt, layers=[0])


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("thinker.model.layers.0.self_attn.q_proj.weight", [32, 64], [64, 64]),
        ("thinker.model.embed_tokens.weight", [100, 64], [128, 64]),
        ("thinker.model.layers.1.mlp.gate.weight", [6, 64], [8, 64]),
        (UP_KEY, [32, 63], [32, 64]),
    ],
)
@pytest.mark.parametrize("bound", [None, 3])
def test_shape_disagrees_with_config(ckpt, key, shape, expected, bound):
    shard = edit_shard(ckpt, key, lambda t: t.update({key: torch.zeros(shape)}))
    with raises(shard, key, f"has shape {shape}", f"expected {expected}"):
        load_thinker(ckpt, max_resident_experts=bound)


def test_fused_experts_with_the_wrong_shape(tmp_path):
    write(tmp_path, experts="fused")
    key = "thinker.model.layers.0.mlp.experts.down_proj"
    shard = edit_shard(tmp_path, key, lambda t: t.update({key: torch.zeros(7, 64, 32)}))
    with raises(shard, key, "has shape [7, 64, 32]", "expected [8, 64, 32]"):
        load_thinker(tmp_path, max_resident_experts=4)


def test_integer_weight(ckpt):
    key = "thinker.model.layers.0.input_layernorm.weight"
    shard = edit_shard(ckpt, key, lambda t: t.update({key: torch.ones(64, dtype=torch.int64)}))
    with raises(shard, key, "dtype I64"):
        load_thinker(ckpt)


def test_no_thinker_in_the_file(tmp_path):
    write(tmp_path, num_shards=1)
    single = tmp_path / "model.safetensors"
    save_file(foreign_tensors(), single, {"format": "pt"})
    with raises(single, "no thinker text model found"):
        load_thinker(tmp_path)


# --- experts read on demand: failures at first use -------------------------------------------

EXPERT_KEY = r"thinker\.model\.layers\.\d\.mlp\.experts\.\d\.(gate|up|down)_proj\.weight"


def test_on_demand_shard_deleted_after_load(ckpt):
    model = load_thinker(ckpt, max_resident_experts=2)
    for shard in ckpt.glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(
        CheckpointError, match=rf"model-0000[12]-of-00002\.safetensors.*missing.*{EXPERT_KEY}"
    ):
        model(IDS)


def test_on_demand_shard_truncated_after_load(ckpt):
    model = load_thinker(ckpt, max_resident_experts=2)
    for shard in ckpt.glob("model-*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(
        CheckpointError, match=rf"model-0000[12]-of-00002\.safetensors.*truncated.*{EXPERT_KEY}"
    ):
        model(IDS)


def test_on_demand_file_replaced_with_other_shapes_after_load(tmp_path):
    write(tmp_path, num_shards=1)
    model = load_thinker(tmp_path, max_resident_experts=2)
    write(tmp_path, dataclasses.replace(CFG, moe_intermediate_size=16), num_shards=1)
    with pytest.raises(CheckpointError, match=rf"{EXPERT_KEY}.*has shape \[16, 64\].*\[32, 64\]"):
        model(IDS)


def test_fused_on_demand_shard_deleted_after_load(tmp_path):
    write(tmp_path, experts="fused")
    model = load_thinker(tmp_path, max_resident_experts=1)
    for shard in tmp_path.glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(
        CheckpointError, match=r"missing.*thinker\.model\.layers\.0\.mlp\.experts\.gate_up_proj"
    ):
        model(IDS)


@pytest.mark.parametrize("bound", [None, 2 * 8])
def test_loaded_weights_do_not_depend_on_the_files(ckpt, bound):
    model = load_thinker(ckpt, max_resident_experts=bound)
    before = model(IDS)  # with a bound of all experts, every used expert is now cached
    for shard in ckpt.glob("model-*.safetensors"):
        shard.write_bytes(b"")  # a zero-copy view of the memory map would now fault
    assert torch.equal(model(IDS), before)
