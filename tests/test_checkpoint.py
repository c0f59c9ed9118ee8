"""load_thinker and save_thinker_checkpoint: layouts, selective reads, dtypes, arguments,
writer determinism and the memory arithmetic."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from checkpoints import foreign_tensors
from safetensors import safe_open

from sage_core.checkpoint import (
    SafetensorsReader,
    detect_layout,
    experts,
    load_thinker,
    memory_estimate,
    reader,
    save_thinker_checkpoint,
)
from sage_core.errors import CheckpointError
from sage_core.model.config import ThinkerTextConfig, nested_config_dict, parse_config, read_config
from sage_core.model.moe import ResidentExperts
from sage_core.model.rope import rope_inv_freq
from sage_core.model.thinker import Qwen3OmniThinker

CFG = ThinkerTextConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=48,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    mrope_section=(3, 3, 2),
)
FOREIGN_PREFIXES = ("talker.", "code2wav.", "thinker.audio_tower.", "thinker.visual.")


def random_state(cfg=CFG, seed=0) -> dict:
    model = Qwen3OmniThinker(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model.state_dict()


def ids(seed=0, shape=(2, 7)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ckpt(tmp_path):
    """The real layout: `thinker.` keys, two shards with an index, per-expert, foreign keys."""
    save_thinker_checkpoint(random_state(), CFG, tmp_path, extra_tensors=foreign_tensors())
    return tmp_path


class ReadLog:
    """Records every tensor key whose data (or header) the loader asks for."""

    def __init__(self, monkeypatch):
        self.read, self.header = [], []
        real_read, real_header = SafetensorsReader.read, SafetensorsReader.header
        real_read_into = SafetensorsReader.read_into

        def read(reader, key, index=None):
            self.read.append(key)
            return real_read(reader, key, index)

        def read_into(reader, key, out, index=None):
            self.read.append(key)
            return real_read_into(reader, key, out, index)

        def header(reader, key):
            self.header.append(key)
            return real_header(reader, key)

        monkeypatch.setattr(SafetensorsReader, "read", read)
        monkeypatch.setattr(SafetensorsReader, "read_into", read_into)
        monkeypatch.setattr(SafetensorsReader, "header", header)


# --- layouts -----------------------------------------------------------------------------


def test_detect_layout_from_key_names():
    assert detect_layout(["thinker.model.embed_tokens.weight", "talker.x"], "f") == "thinker"
    assert detect_layout(["model.embed_tokens.weight", "lm_head.weight"], "f") == "thinker_only"
    assert detect_layout(["embed_tokens.weight", "norm.weight"], "f") == "text"
    with pytest.raises(CheckpointError, match="f: no thinker text model found"):
        detect_layout(["talker.model.embed_tokens.weight"], "f")


@pytest.mark.parametrize("layout", ["thinker", "thinker_only", "text"])
@pytest.mark.parametrize("experts", ["per_expert", "fused"])
@pytest.mark.parametrize("num_shards", [1, 3])
def test_every_layout_loads_the_same_weights(tmp_path, layout, experts, num_shards):
    state = random_state()
    save_thinker_checkpoint(
        state, CFG, tmp_path, layout=layout, experts=experts, num_shards=num_shards
    )
    keys = SafetensorsReader(tmp_path).keys()
    assert detect_layout(keys, "x") == layout
    assert any(".experts.gate_up_proj" in k for k in keys) == (experts == "fused")
    model = load_thinker(tmp_path)
    got = model.state_dict()
    want = {k: v for k, v in state.items() if not (layout == "text" and k == "lm_head.weight")}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert isinstance(model.model.layers["0"].mlp.experts, ResidentExperts)
    assert (model.lm_head is None) == (layout == "text")


def test_thinker_only_and_text_configs_are_read_too(tmp_path):
    # Exporters also write the thinker-only or bare text config.json; the weights do not care.
    state = random_state()
    save_thinker_checkpoint(state, CFG, tmp_path, layout="text")
    text_config = nested_config_dict(CFG)["thinker_config"]["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(text_config))
    assert read_config(tmp_path) == CFG
    hidden = load_thinker(tmp_path).hidden_states(ids())
    want = load_thinker(tmp_path, layers=3).hidden_states(ids())
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)


# --- only the needed tensors are read --------------------------------------------------


def test_reads_only_the_chosen_layers_and_never_foreign_keys(ckpt, monkeypatch):
    log = ReadLog(monkeypatch)
    model = load_thinker(ckpt, layers=[1])
    assert model.layer_indices == [1]
    for key in log.read + log.header:
        assert not key.startswith(FOREIGN_PREFIXES), key
        assert ".layers.0." not in key and ".layers.2." not in key, key
    want = {"thinker." + k for k in model.state_dict() if ".mlp.experts." not in k}
    want |= {
        f"thinker.model.layers.1.mlp.experts.{e}.{name}_proj.weight"
        for e in range(CFG.num_experts)
        for name in ("gate", "up", "down")
    }
    assert set(log.read) == want
    assert len(log.read) == len(want)  # each tensor read once


def test_on_demand_reads_no_expert_at_load_and_only_used_ones_later(ckpt, monkeypatch):
    log = ReadLog(monkeypatch)
    model = load_thinker(ckpt, max_resident_experts=4)
    assert not any(".mlp.experts." in k for k in log.read)
    # ...but every expert's header was checked at load time.
    assert sum(".mlp.experts." in k for k in log.header) == 3 * 3 * CFG.num_experts
    log.read.clear()
    with model.routing_trace() as trace:
        model(ids())
    used = {(i, int(e)) for i, calls in trace.items() for e in torch.unique(calls[0][0])}
    read = {(int(k.split(".")[3]), int(k.split(".")[6])) for k in log.read}
    assert read == used
    assert not any(k.startswith(FOREIGN_PREFIXES) for k in log.read)


def test_on_demand_opens_each_shard_once(ckpt, monkeypatch):
    model = load_thinker(ckpt, max_resident_experts=2)
    opened = []
    real_open = reader.open_shard

    def counting_open(path):
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(reader, "open_shard", counting_open)
    model(ids())
    model(ids(1))
    assert model.expert_cache.stats()["misses"] > 2
    assert 1 <= len(opened) == len(set(opened)) <= 2


# --- dtypes and device -----------------------------------------------------------------


def all_tensors(model):
    return [*model.parameters(), *model.buffers()]


def test_float64_inv_freq_in_the_file_is_ignored(tmp_path, monkeypatch):
    state = random_state()
    clean, stray = tmp_path / "clean", tmp_path / "stray"
    save_thinker_checkpoint(state, CFG, clean)
    inv_freq64 = rope_inv_freq(CFG.head_dim, CFG.rope_theta).double()
    extra = {
        "thinker.model.rotary_emb.inv_freq": inv_freq64,
        "thinker.model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq64,  # older exporters
    }
    save_thinker_checkpoint(state, CFG, stray, extra_tensors=extra)
    index = json.loads((stray / "model.safetensors.index.json").read_text())
    assert "thinker.model.rotary_emb.inv_freq" in index["weight_map"]
    log = ReadLog(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_thinker(stray, dtype=dtype)
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        x = model.model.embed_tokens(ids())
        cos, sin = model.model.rotary_emb(x, torch.arange(7).expand(2, 7))
        assert cos.dtype == sin.dtype == dtype
        logits = model(ids())
        assert logits.dtype == dtype
        assert torch.equal(logits, load_thinker(clean, dtype=dtype)(ids()))
    assert not any("inv_freq" in k for k in log.read + log.header)


def test_bf16_checkpoint_gives_bf16_weights_and_logits(tmp_path):
    save_thinker_checkpoint(random_state(), CFG, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model-00001-of-00002.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = load_thinker(tmp_path, dtype="bfloat16")
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    logits = model(ids())
    assert logits.dtype == torch.bfloat16
    # The same bf16 weights computed in float32: close, not equal.
    reference = load_thinker(tmp_path, dtype=torch.float32)(ids())
    assert reference.dtype == torch.float32
    err = (logits.float() - reference).abs().max().item()
    assert 0 < err < 0.05 * reference.abs().max().item()


def test_bf16_on_demand_experts_are_bf16(tmp_path):
    save_thinker_checkpoint(random_state(), CFG, tmp_path, dtype=torch.bfloat16)
    model = load_thinker(tmp_path, max_resident_experts=3, dtype=torch.bfloat16)
    gate_up, down = model.model.layers["2"].mlp.experts.expert(5)
    assert gate_up.dtype == down.dtype == torch.bfloat16
    assert model(ids()).dtype == torch.bfloat16
    resident = load_thinker(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(model(ids()), resident(ids()))


def test_float64_checkpoint_loads_as_float32(tmp_path):
    state = random_state()
    save_thinker_checkpoint(state, CFG, tmp_path, dtype=torch.float64, experts="fused")
    model = load_thinker(tmp_path, dtype=torch.float32)
    assert {t.dtype for t in model.parameters()} == {torch.float32}
    assert model(ids()).dtype == torch.float32
    # float32 -> float64 -> float32 is exact.
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_is_honoured(ckpt, device):
    for bound in (None, 2):
        model = load_thinker(ckpt, device=device, max_resident_experts=bound)
        assert {t.device for t in all_tensors(model)} == {torch.device("cpu")}
        gate_up, _ = model.model.layers["0"].mlp.experts.expert(0)
        assert gate_up.device == torch.device("cpu")


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, kept",
    [(None, [0, 1, 2]), (2, [0, 1]), (3, [0, 1, 2]), ([2, 0], [0, 2]), (range(1, 3), [1, 2]),
     ((1,), [1]), ([np.int64(2)], [2])],
)  # fmt: skip
def test_layers_forms(ckpt, layers, kept):
    model = load_thinker(ckpt, layers=layers)
    assert model.layer_indices == kept
    assert sorted(model.model.layers) == [str(i) for i in kept]


@pytest.mark.parametrize(
    "layers, message",
    [(0, "layers=0"), (4, "layers=4"), (-1, "layers=-1"), ([3], "layers contains 3"),
     ([-1], "layers contains -1"), ([0, 0], "duplicates"), ([], "empty"),
     ("1", "layers must be"), (1.5, "layers must be"), (True, "layers must be"),
     ([True], "layers contains True"), ([0.5], "layers contains 0.5")],
)  # fmt: skip
def test_bad_layers_are_value_errors(ckpt, layers, message):
    with pytest.raises(ValueError, match=message):
        load_thinker(ckpt, layers=layers)


@pytest.mark.parametrize("bound", [0, -3, True, 1.5, "4"])
def test_bad_max_resident_experts(ckpt, bound):
    with pytest.raises(ValueError, match="max_resident_experts"):
        load_thinker(ckpt, max_resident_experts=bound)


def test_bad_dtype_and_device(ckpt):
    with pytest.raises(ValueError, match="dtype"):
        load_thinker(ckpt, dtype="int8")
    with pytest.raises(ValueError, match="device='nonsense'"):
        load_thinker(ckpt, device="nonsense")


def test_writer_argument_errors(tmp_path):
    state = random_state()
    with pytest.raises(ValueError, match="layout"):
        save_thinker_checkpoint(state, CFG, tmp_path, layout="hf")
    with pytest.raises(ValueError, match="experts"):
        save_thinker_checkpoint(state, CFG, tmp_path, experts="stacked")
    with pytest.raises(ValueError, match="num_shards"):
        save_thinker_checkpoint(state, CFG, tmp_path, num_shards=0)
    with pytest.raises(ValueError, match="clashes"):
        save_thinker_checkpoint(
            state, CFG, tmp_path, extra_tensors={"thinker.model.norm.weight": torch.ones(64)}
        )


# --- writer --------------------------------------------------------------------------------


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_writer_is_deterministic_and_atomic(tmp_path):
    state = random_state()
    a, b = tmp_path / "a", tmp_path / "b"
    save_thinker_checkpoint(state, CFG, a, num_shards=3, extra_tensors=foreign_tensors())
    save_thinker_checkpoint(
        dict(reversed(state.items())), CFG, b, num_shards=3, extra_tensors=foreign_tensors()
    )
    assert file_bytes(a) == file_bytes(b)
    assert sorted(file_bytes(a)) == [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]  # no temporary file left behind
    before = file_bytes(a)
    save_thinker_checkpoint(state, CFG, a, num_shards=3, extra_tensors=foreign_tensors())
    assert file_bytes(a) == before


def test_index_and_shards_agree_and_are_balanced(tmp_path):
    save_thinker_checkpoint(random_state(), CFG, tmp_path, num_shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)
    sizes, largest, total = {}, 0, 0
    for name in sorted(set(weight_map.values())):
        with safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == sorted(k for k, v in weight_map.items() if v == name)
            for key in f.keys():
                nbytes = f.get_tensor(key).nbytes
                sizes[name] = sizes.get(name, 0) + nbytes
                largest, total = max(largest, nbytes), total + nbytes
    assert index["metadata"]["total_size"] == total
    assert max(sizes.values()) - min(sizes.values()) <= largest
    assert read_config(tmp_path) == CFG
    assert json.loads((tmp_path / "config.json").read_text()) == nested_config_dict(CFG)


def test_rewrite_removes_stale_shards(tmp_path):
    state = random_state()
    save_thinker_checkpoint(state, CFG, tmp_path, num_shards=3)
    save_thinker_checkpoint(state, CFG, tmp_path, num_shards=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_thinker(tmp_path).lm_head.weight, state["lm_head.weight"])


def test_per_expert_keys_split_gate_first(tmp_path):
    state = random_state()
    save_thinker_checkpoint(state, CFG, tmp_path, num_shards=1)
    fused = state["model.layers.1.mlp.experts.gate_up_proj"][5]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        gate = f.get_tensor("thinker.model.layers.1.mlp.experts.5.gate_proj.weight")
        up = f.get_tensor("thinker.model.layers.1.mlp.experts.5.up_proj.weight")
    assert gate.shape == up.shape == (CFG.moe_intermediate_size, CFG.hidden_size)
    assert torch.equal(torch.cat([gate, up]), fused)


def test_tied_embeddings_without_lm_head_key(tmp_path):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    state = random_state(cfg)
    state.pop("lm_head.weight")
    save_thinker_checkpoint(state, cfg, tmp_path)
    model = load_thinker(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(
        model(ids()), model.hidden_states(ids()) @ state["model.embed_tokens.weight"].T
    )


# --- memory arithmetic ------------------------------------------------------------------


REAL_TEXT_CONFIG = {
    "model_type": "qwen3_omni_moe",
    "thinker_config": {
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 2048,
            "intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000,
            "rope_scaling": {"mrope_section": [24, 20, 20], "interleaved": True, "type": "default"},
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    },
}


def test_memory_estimate_of_the_real_thinker():
    est = memory_estimate(parse_config(REAL_TEXT_CONFIG), torch.bfloat16)
    assert est["bytes_per_expert"] == 3 * 2048 * 768 * 2 == 9_437_184  # 9.44 MB
    assert est["num_experts_total"] == 6144
    assert est["experts"] == 6144 * 9_437_184
    assert round(est["experts"] / 1e9) == 58
    assert est["embeddings_lm_head"] == 2 * 152064 * 2048 * 2
    assert est["dense_mlp"] == 0
    assert round(est["thinker"] / 1e9) == 61
    assert (
        est["thinker"] == est["experts"] + est["attention_norms_router"] + est["embeddings_lm_head"]
    )
    # Three layers with at most 64 experts resident: attention, router and embeddings of three
    # layers plus 64 experts (0.6 GB), not 58 GB.
    few = memory_estimate(parse_config(REAL_TEXT_CONFIG), layers=3, max_resident_experts=64)
    assert 64 * 9_437_184 < few["resident"] - est["embeddings_lm_head"] < 1e9


@pytest.mark.parametrize("layers, bound", [(None, None), ([0, 2], None), (None, 5), (2, 100)])
def test_memory_estimate_matches_what_the_loader_holds(ckpt, layers, bound):
    model = load_thinker(ckpt, layers=layers, max_resident_experts=bound)
    params = sum(p.nbytes for p in model.parameters())
    est = memory_estimate(CFG, torch.float32, layers=layers, max_resident_experts=bound)
    if bound is None:
        assert est.get("resident", est["thinker"]) == params
    else:
        sparse = [i for i in model.layer_indices if CFG.is_sparse(i)]
        cached = min(bound, len(sparse) * CFG.num_experts) * est["bytes_per_expert"]
        assert est["resident"] == params + cached
    if layers is None and bound is None:
        assert est["thinker"] == params


@pytest.mark.parametrize("experts", ["per_expert", "fused"])
def test_resident_experts_are_stored_transposed_with_the_same_values(tmp_path, experts):
    state = random_state()
    save_thinker_checkpoint(state, CFG, tmp_path, experts=experts)
    model = load_thinker(tmp_path)
    inter, H = CFG.moe_intermediate_size, CFG.hidden_size
    for i in range(CFG.num_hidden_layers):
        gate_up = model.model.layers[str(i)].mlp.experts.gate_up_proj
        down = model.model.layers[str(i)].mlp.experts.down_proj
        assert gate_up.shape == (CFG.num_experts, 2 * inter, H)
        assert gate_up.stride() == (2 * inter * H, 1, 2 * inter)  # each expert column-major
        assert down.stride() == (H * inter, 1, H)
        torch.testing.assert_close(gate_up, state[f"model.layers.{i}.mlp.experts.gate_up_proj"])
        torch.testing.assert_close(down, state[f"model.layers.{i}.mlp.experts.down_proj"])
    # Saving what was loaded writes the same checkpoint tensors (contiguous, row-major).
    save_thinker_checkpoint(model.state_dict(), CFG, tmp_path / "again", experts=experts)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(tmp_path / name, "pt") as a, safe_open(tmp_path / "again" / name, "pt") as b:
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_expert_stack_is_transposed_on_cpu_only():
    cpu = experts.expert_stack(3, 4, 5, dtype=torch.float32, device="cpu")
    other = experts.expert_stack(3, 4, 5, dtype=torch.float32, device="meta")
    assert cpu.shape == other.shape == (3, 4, 5)
    assert cpu.stride() == (20, 1, 4) and other.stride() == (20, 5, 1)
