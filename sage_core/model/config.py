"""The text-model config of the Qwen3-Omni thinker, read from a real `config.json`.

Three layouts reach us: the full checkpoint (`model_type: qwen3_omni_moe`, the text
model under `thinker_config.text_config`), a thinker-only export (a dict with
`text_config` at the top) and a bare text export (the text config itself). Rotary
settings live in `rope_scaling` (older files) or `rope_parameters` (newer ones), with
`rope_theta` beside them or inside. All of it lands in one frozen dataclass.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sage_core.errors import CheckpointError

NESTED_MODEL_TYPES = {"qwen3_omni_moe"}
THINKER_MODEL_TYPES = {"qwen3_omni_moe_thinker"}
TEXT_MODEL_TYPES = {"qwen3_omni_moe_text", "qwen3_omni_moe_thinker_text"}


@dataclass(frozen=True)
class ThinkerTextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # width of the dense MLP (mlp_only_layers); 0 when no layer is dense
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    def is_sparse(self, layer_idx: int) -> bool:
        """transformers' rule for whether a decoder layer uses the MoE block."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mrope_section"] = list(self.mrope_section)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    def config_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


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


def _field(raw: dict, name: str, kind, source: str, default=dataclasses.MISSING):
    if name not in raw or raw[name] is None:
        if default is dataclasses.MISSING:
            raise CheckpointError(f"{source}: missing required field {name!r}")
        return default
    value = raw[name]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise CheckpointError(f"{source}: field {name!r} must be {kind.__name__}, got {value!r}")
    return kind(value)


def parse_config(raw: dict, source: str = "config.json") -> ThinkerTextConfig:
    """Turn a parsed `config.json` (any of the three layouts) into a ThinkerTextConfig."""
    text = _text_section(raw, source)

    rope = text.get("rope_parameters")
    if rope is None:
        rope = text.get("rope_scaling")
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: field 'rope_scaling'/'rope_parameters' must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"{source}: unsupported rope_type {rope_type!r} in 'rope_scaling'; only 'default'"
        )
    if "rope_theta" in rope:
        rope_theta = _field(rope, "rope_theta", float, source)
    else:
        rope_theta = _field(text, "rope_theta", float, source)
    section = rope.get("mrope_section")
    if section is None:
        raise CheckpointError(f"{source}: missing required field 'rope_scaling.mrope_section'")
    if (
        not isinstance(section, list | tuple)
        or len(section) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in section)
    ):
        raise CheckpointError(
            f"{source}: field 'mrope_section' must be a list of 3 ints, got {section!r}"
        )
    interleaved = rope.get("interleaved", rope.get("mrope_interleaved", True))
    if interleaved is not True:
        raise CheckpointError(
            f"{source}: field 'rope_scaling.interleaved' is {interleaved!r}; "
            "Qwen3-Omni uses the interleaved M-RoPE layout only"
        )

    hidden = _field(text, "hidden_size", int, source)
    heads = _field(text, "num_attention_heads", int, source)
    mlp_only = text.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in mlp_only
    ):
        raise CheckpointError(f"{source}: field 'mlp_only_layers' must be a list of ints")
    hidden_act = _field(text, "hidden_act", str, source, "silu")
    if hidden_act != "silu":
        raise CheckpointError(f"{source}: field 'hidden_act' is {hidden_act!r}; only 'silu'")
    attention_bias = _field(text, "attention_bias", bool, source, False)
    if attention_bias:
        raise CheckpointError(f"{source}: field 'attention_bias' is true; Qwen3-Omni has none")

    cfg = ThinkerTextConfig(
        vocab_size=_field(text, "vocab_size", int, source),
        hidden_size=hidden,
        num_hidden_layers=_field(text, "num_hidden_layers", int, source),
        num_attention_heads=heads,
        num_key_value_heads=_field(text, "num_key_value_heads", int, source),
        head_dim=_field(text, "head_dim", int, source, hidden // heads if heads > 0 else 0),
        intermediate_size=_field(text, "intermediate_size", int, source, 0),
        moe_intermediate_size=_field(text, "moe_intermediate_size", int, source),
        num_experts=_field(text, "num_experts", int, source),
        num_experts_per_tok=_field(text, "num_experts_per_tok", int, source),
        norm_topk_prob=_field(text, "norm_topk_prob", bool, source, True),
        rms_norm_eps=_field(text, "rms_norm_eps", float, source, 1e-6),
        rope_theta=rope_theta,
        mrope_section=tuple(section),
        mrope_interleaved=True,
        decoder_sparse_step=_field(text, "decoder_sparse_step", int, source, 1),
        mlp_only_layers=tuple(sorted(set(mlp_only))),
        hidden_act=hidden_act,
        attention_bias=attention_bias,
        tie_word_embeddings=_field(
            text, "tie_word_embeddings", bool, source, raw.get("tie_word_embeddings", False)
        ),
        max_position_embeddings=_field(text, "max_position_embeddings", int, source, 32768),
    )
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
    text = {
        "model_type": "qwen3_omni_moe_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {
            "mrope_section": list(cfg.mrope_section),
            "interleaved": True,
            "rope_type": "default",
        },
        "attention_bias": cfg.attention_bias,
        "decoder_sparse_step": cfg.decoder_sparse_step,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "mlp_only_layers": list(cfg.mlp_only_layers),
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        "enable_audio_output": False,
        "thinker_config": {"model_type": "qwen3_omni_moe_thinker", "text_config": text},
    }
