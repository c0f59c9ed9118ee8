"""The text-model config of the Qwen3-Omni thinker, read from a real `config.json`.

Three layouts reach us: the full checkpoint (`model_type: qwen3_omni_moe`, the text
model under `thinker_config.text_config`), a thinker-only export (a dict with
`text_config` at the top) and a bare text export (the text config itself). Rotary
settings live in `rope_scaling` (older files) or `rope_parameters` (newer ones), with
`rope_theta` beside them or inside. All of it lands in one frozen dataclass, whose
fields are the only list of config keys: `parse_config` and `nested_config_dict`
walk `dataclasses.fields()`, and each field's metadata says where its key lives in
the file when that is not the field's own name at the top of the text config.
"""

import dataclasses
import hashlib
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sage_core.errors import CheckpointError

NESTED_MODEL_TYPES = {"qwen3_omni_moe"}
THINKER_MODEL_TYPES = {"qwen3_omni_moe_thinker"}
TEXT_MODEL_TYPES = {"qwen3_omni_moe_text", "qwen3_omni_moe_thinker_text"}
ROPE_SECTION = "rope_scaling"  # what the writer names the rotary dict (readers accept both)


def _key(default=dataclasses.MISSING, **metadata):
    """A config field with how it appears in `config.json`. Metadata keys:

    key: the name in the file (default: the field's name);
    section: ROPE_SECTION when the key lives in the rotary dict;
    also_in_rope: the rotary dict may carry the key too, and wins (rope_theta);
    required: missing from the file is an error even though the dataclass has a default;
    if_missing: the value when the file omits the key, for a field without a default;
    only: the one value this implementation supports, with why: the reason for others.
    """
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ThinkerTextConfig:
    vocab_size: int
    hidden_size: int  # H, the residual stream width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # grouped-query attention: query heads share these KV heads
    head_dim: int  # defaults to hidden_size // num_attention_heads when the file omits it
    # Width of the dense MLP (mlp_only_layers); 0 when no layer is dense.
    intermediate_size: int = _key(if_missing=0)
    moe_intermediate_size: int  # width of one expert's MLP
    num_experts: int  # E, experts per sparse layer
    num_experts_per_tok: int  # k, experts each token is routed to
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to one
    rms_norm_eps: float = 1e-6
    rope_theta: float = _key(1_000_000.0, also_in_rope=True, required=True)
    # Rotary frequency pairs given to the (temporal, height, width) position axes.
    mrope_section: tuple[int, int, int] = _key((24, 20, 20), section=ROPE_SECTION, required=True)
    mrope_interleaved: bool = _key(
        True,
        key="interleaved",
        section=ROPE_SECTION,
        only=True,
        why="Qwen3-Omni uses the interleaved M-RoPE layout only",
    )
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    hidden_act: str = _key("silu", only="silu", why="only 'silu'")
    attention_bias: bool = _key(False, only=False, why="Qwen3-Omni has none")
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    max_position_embeddings: int = 32768

    def is_sparse(self, layer_idx: int) -> bool:
        """transformers' rule for whether a decoder layer uses the MoE block."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def config_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _plain(value):
    """A field's value as JSON holds it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _text_section(raw: dict, source: str) -> dict:
    """Find the text-model dict inside any of the three layouts."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    known = NESTED_MODEL_TYPES | THINKER_MODEL_TYPES | TEXT_MODEL_TYPES
    if model_type is not None and model_type not in known:
        raise CheckpointError(
            f"{source}: unknown model_type {model_type!r}; expected one of {sorted(known)}"
        )
    if "thinker_config" in raw or model_type in NESTED_MODEL_TYPES:
        thinker = raw.get("thinker_config")
        if not isinstance(thinker, dict):
            raise CheckpointError(f"{source}: missing field 'thinker_config' (a JSON object)")
        raw, where = thinker, "thinker_config."
    else:
        where = ""
    if where or "text_config" in raw or raw.get("model_type") in THINKER_MODEL_TYPES:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(f"{source}: missing field '{where}text_config' (a JSON object)")
        inner_type = text.get("model_type")
        if inner_type is not None and inner_type not in TEXT_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unknown model_type {inner_type!r} in '{where}text_config'; "
                f"expected one of {sorted(TEXT_MODEL_TYPES)}"
            )
        return text
    return raw


def _rope_section(text: dict, source: str) -> dict:
    """The rotary dict (`rope_parameters`, else `rope_scaling`), checked to be the default kind."""
    rope = text.get("rope_parameters")
    if rope is None:
        rope = text.get(ROPE_SECTION)
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: field 'rope_scaling'/'rope_parameters' must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: unsupported rope_type {rope_type!r} in 'rope_scaling'; only 'default'"
        )
    return rope


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert(value, kind, label: str, source: str):
    """`value` from the file as a field of type `kind`, or a CheckpointError naming `label`."""
    if kind in (tuple[int, int, int], tuple[int, ...]):
        fixed = kind == tuple[int, int, int]
        if (
            isinstance(value, list | tuple)
            and (not fixed or len(value) == 3)
            and all(_is_int(v) for v in value)
        ):
            return tuple(value) if fixed else tuple(sorted(set(value)))
        expected = "a list of 3 ints" if fixed else "a list of ints"
        raise CheckpointError(f"{source}: field {label!r} must be {expected}, got {value!r}")
    ok = {
        int: _is_int(value),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise CheckpointError(f"{source}: field {label!r} must be {kind.__name__}, got {value!r}")
    return kind(value)


def parse_config(raw: dict, source: str = "config.json") -> ThinkerTextConfig:
    """Turn a parsed `config.json` (any of the three layouts) into a ThinkerTextConfig."""
    text = _text_section(raw, source)
    rope = _rope_section(text, source)
    values = {}
    for f in dataclasses.fields(ThinkerTextConfig):
        key, meta = f.metadata.get("key", f.name), f.metadata
        section = rope if meta.get("section") == ROPE_SECTION else text
        if meta.get("also_in_rope") and key in rope:
            section = rope
        label = f"{meta['section']}.{key}" if "section" in meta else key
        value = section.get(key)
        if value is None and key == "interleaved":
            value = section.get("mrope_interleaved")  # the key's older name
        if value is not None:
            value = _convert(value, f.type, label, source)
        elif f.name == "head_dim" and values["num_attention_heads"] > 0:
            value = values["hidden_size"] // values["num_attention_heads"]
        elif f.name == "tie_word_embeddings" and raw.get(key) is not None:
            value = _convert(raw[key], f.type, key, source)  # set on the outer config
        elif "if_missing" in meta:
            value = meta["if_missing"]
        elif f.default is dataclasses.MISSING or meta.get("required"):
            raise CheckpointError(f"{source}: missing required field {label!r}")
        else:
            value = f.default
        if "only" in meta and value != meta["only"]:
            raise CheckpointError(f"{source}: field {label!r} is {value!r}; {meta['why']}")
        values[f.name] = value
    cfg = ThinkerTextConfig(**values)
    _validate(cfg, source)
    return cfg


def _validate(cfg: ThinkerTextConfig, source: str) -> None:
    def bad(field, why):
        raise CheckpointError(f"{source}: field {field!r} = {getattr(cfg, field)!r}: {why}")

    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "decoder_sparse_step",
    ):
        if getattr(cfg, name) <= 0:
            bad(name, "must be positive")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        bad("num_key_value_heads", f"must divide num_attention_heads={cfg.num_attention_heads}")
    if cfg.head_dim % 2:
        bad("head_dim", "must be even for RoPE")
    if 2 * sum(cfg.mrope_section) != cfg.head_dim:
        bad("mrope_section", f"must sum to head_dim // 2 = {cfg.head_dim // 2}")
    if cfg.num_experts < 0:
        bad("num_experts", "must be >= 0")
    has_sparse = any(cfg.is_sparse(i) for i in range(cfg.num_hidden_layers))
    if has_sparse:
        if cfg.moe_intermediate_size <= 0:
            bad("moe_intermediate_size", "must be positive")
        if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
            bad("num_experts_per_tok", f"must be in [1, num_experts={cfg.num_experts}]")
    if not all(cfg.is_sparse(i) for i in range(cfg.num_hidden_layers)):
        if cfg.intermediate_size <= 0:
            bad("intermediate_size", "a dense layer needs a positive dense MLP width")
    if cfg.rms_norm_eps <= 0:
        bad("rms_norm_eps", "must be positive")


def read_config(path) -> ThinkerTextConfig:
    """Read `<dir>/config.json` (or the JSON file itself) into a ThinkerTextConfig."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint directory or config file")
        raise CheckpointError(f"{file}: config file not found")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read config: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON: {e}") from e
    return parse_config(raw, source=str(file))


def nested_config_dict(cfg: ThinkerTextConfig) -> dict:
    """The real Qwen3-Omni `config.json` layout for `cfg` (what checkpoint writers save)."""
    text = {"model_type": "qwen3_omni_moe_text"}
    rope = {"rope_type": "default"}
    for f in dataclasses.fields(cfg):
        section = rope if f.metadata.get("section") == ROPE_SECTION else text
        section[f.metadata.get("key", f.name)] = _plain(getattr(cfg, f.name))
    text[ROPE_SECTION] = rope
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        "enable_audio_output": False,
        "thinker_config": {"model_type": "qwen3_omni_moe_thinker", "text_config": text},
    }


def as_index(value) -> int:
    """`value` as a Python int when it is an integer (numpy's included) and not a bool;
    TypeError otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is a bool, not an index")
    return operator.index(value)


def select_layers(layers, num_layers: int, name: str = "layers") -> list[int]:
    """The one check of a layer choice: None (all), N (the first N) or a sequence of
    distinct indices in [0, num_layers) -> sorted indices. `name` is the argument's name
    in the messages (a ValueError)."""
    if layers is None:
        return list(range(num_layers))
    if (
        isinstance(layers, bool)
        or not isinstance(layers, int | Sequence)
        or isinstance(layers, str | bytes)
    ):
        kind = repr(layers) if isinstance(layers, bool | str) else type(layers).__name__
        raise ValueError(f"{name} must be None, an int or a list of ints, got {kind}")
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ValueError(
                f"{name}={layers}: the model has {num_layers} layers; need 1..{num_layers}"
            )
        return list(range(layers))
    if len(layers) == 0:
        raise ValueError(f"{name} is empty; give at least one layer index")
    indices = []
    for item in layers:
        try:
            index = as_index(item)
        except TypeError:
            raise ValueError(f"{name} contains {item!r}; layer indices must be ints") from None
        if not 0 <= index < num_layers:
            raise ValueError(f"{name} contains {index}, out of range [0, {num_layers})")
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} contains duplicates: {list(layers)}")
    return sorted(indices)
