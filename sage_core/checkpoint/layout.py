"""Key names: the model's own key space <-> each file layout (real, thinker-only, text)."""

import re

from sage_core.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LAYOUTS = ("thinker", "thinker_only", "text")
EXPERT_LAYOUTS = ("per_expert", "fused")
# Safetensors header dtypes we accept as weights (converted to the requested dtype on load).
FLOAT_HEADER_DTYPES = {"F16", "BF16", "F32", "F64"}
# Model keys of the stacked expert weights: model.layers.{i}.mlp.experts.{gate_up,down}_proj
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


# ---------------------------------------------------------------------------------------------
# Key names: the model's own key space <-> each file layout
# ---------------------------------------------------------------------------------------------


def file_key(model_key: str, layout: str) -> str:
    """Checkpoint key of a model key (`model.norm.weight`, `lm_head.weight`, ...) in `layout`."""
    if layout == "thinker":
        return "thinker." + model_key
    if layout == "thinker_only":
        return model_key
    if layout == "text":
        if not model_key.startswith("model."):
            raise ValueError(f"the bare text layout has no key for {model_key!r}")
        return model_key.removeprefix("model.")
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def detect_layout(keys, source: str) -> str:
    """Which layout a set of checkpoint keys is in, recognised by its embedding key."""
    keys = set(keys)
    for layout in LAYOUTS:
        if file_key("model.embed_tokens.weight", layout) in keys:
            return layout
    raise CheckpointError(
        f"{source}: no thinker text model found: none of the keys "
        f"{[file_key('model.embed_tokens.weight', lay) for lay in LAYOUTS]} is present"
    )
