"""Qwen3-Omni thinker checkpoints: sharded safetensors in, a ready model out (and a writer).

`load_thinker` reads the real checkpoint layout (`thinker.`-prefixed keys in shards listed by
`model.safetensors.index.json`, next to talker, code2wav, audio and vision weights it never
touches) and the layouts exporters produce: one `model.safetensors`, fused or per-expert MoE
weights, a thinker-only export (`model.*`, `lm_head.weight`) and a bare text export
(`embed_tokens.weight`, `layers.*`, `norm.weight`, no lm_head).

Loading is two passes. The first checks every tensor the chosen layers need, by name, shape
and dtype, from the safetensors headers alone (cheap), so a broken checkpoint fails before
any weight is read and nothing half-built is ever returned. The second reads exactly those
tensors, converts each once to the requested dtype and device, and assigns them into a model
built on the meta device. With `max_resident_experts`, expert weights are instead read on
first use into one LRU cache shared by all layers.

The model's own keys drive the load, so a stray checkpoint buffer such as a float64
`rotary_emb.inv_freq` (bug #1 of the dtype report) is never read: the rotary table is
recomputed in float32 by `MultimodalRotaryEmbedding.reset_buffers`.
"""

from pathlib import Path

import torch

from sage_core.checkpoint.experts import (
    ExpertCache,
    ExpertSource,
    OnDemandExperts,
)
from sage_core.checkpoint.layout import (
    EXPERT_KEY,
    detect_layout,
    file_key,
)
from sage_core.checkpoint.reader import (
    SafetensorsReader,
    _check_header,
    _owned,
)
from sage_core.dtypes import parse_dtype
from sage_core.errors import CheckpointError
from sage_core.model.config import read_config, select_layers
from sage_core.offload.cache_policy import POLICY_NAMES


def _check_resident_bound(max_resident_experts) -> None:
    if max_resident_experts is None:
        return
    if (
        isinstance(max_resident_experts, bool)
        or not isinstance(max_resident_experts, int)
        or max_resident_experts < 1
    ):
        raise ValueError(
            f"max_resident_experts must be None or an int >= 1, got {max_resident_experts!r}"
        )


def load_thinker(
    path,
    layers=None,
    max_resident_experts=None,
    device="cpu",
    dtype=torch.float32,
    cache_policy="lru",
):
    """Load the Qwen3-Omni thinker text model from a checkpoint directory.

    path: directory with `config.json` and `model.safetensors` or shards plus
        `model.safetensors.index.json`, in any layout of the module docstring.
    layers: None (all), N (the first N) or a list of layer indices.
    max_resident_experts: None (every expert of the chosen layers in memory) or a bound on
        the experts held across the model; the rest are read on demand (`model.expert_cache`).
    device, dtype: where and in what dtype the weights live; converted once, on load.
    cache_policy: which expert the bounded cache evicts (`offload.cache_policy.POLICY_NAMES`); unused
        without `max_resident_experts`.

    Raises CheckpointError (naming the file, key and shapes) for a broken checkpoint and
    ValueError for bad arguments; never returns a partially loaded model.
    """
    from sage_core.model.thinker import Qwen3OmniThinker  # deferred: importing the model is heavier

    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise CheckpointError(f"{path}: not a directory; give the checkpoint directory")
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg = read_config(path)
    layer_indices = select_layers(layers, cfg.num_hidden_layers)
    _check_resident_bound(max_resident_experts)
    if cache_policy not in POLICY_NAMES:
        raise ValueError(f"unknown cache_policy {cache_policy!r}; choose one of {POLICY_NAMES}")
    dtype = parse_dtype(dtype)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device: {e}") from e

    reader = SafetensorsReader(path)
    try:
        layout = detect_layout(reader.keys(), str(reader.source))
        embed_key = file_key("model.embed_tokens.weight", layout)
        lm_head_key = None if layout == "text" else file_key("lm_head.weight", layout)
        if lm_head_key is not None and lm_head_key not in reader.keys():
            lm_head_key = embed_key if cfg.tie_word_embeddings else None
        with torch.device("meta"):
            model = Qwen3OmniThinker(cfg, layer_indices, with_lm_head=lm_head_key is not None)

        # Every sparse layer's experts: resident (stacked into the state dict) or on demand.
        layer_prefix = file_key("model.layers.", layout)
        sources = {
            i: ExpertSource(reader, f"{layer_prefix}{i}.mlp.experts.", cfg, dtype, device)
            for i in layer_indices
            if cfg.is_sparse(i)
        }
        cache = None
        if max_resident_experts is not None:
            cache = ExpertCache(max_resident_experts, policy=cache_policy, layers=list(sources))
        if cache is not None:
            for i, source in sources.items():
                model.model.layers[str(i)].mlp.experts = OnDemandExperts(i, source, cache)

        plan = _check_headers(model, reader, layout, lm_head_key, sources)
        state = _read_state(reader, plan, embed_key, device, dtype)
        if cache is None:
            for i, source in sources.items():
                prefix = f"model.layers.{i}.mlp.experts."
                state[prefix + "gate_up_proj"], state[prefix + "down_proj"] = source.read_all()
        model.load_state_dict(state, strict=True, assign=True)
        if plan.get("lm_head.weight") == embed_key:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb.reset_buffers(device)
    finally:
        # Resident weights are copies; on-demand experts reopen their shards lazily.
        reader.close()

    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"load_thinker left tensors on the meta device: {leftover}")
    model.expert_cache = cache
    return model.eval()


def _check_headers(model, reader, layout: str, lm_head_key, sources) -> dict[str, str]:
    """Pass 1: every key and shape the model needs, from the headers, before reading any
    data -> {model key: checkpoint key} for everything but the stacked experts."""
    plan = {}
    for key, tensor in model.state_dict().items():
        if EXPERT_KEY.match(key):
            continue
        source_key = lm_head_key if key == "lm_head.weight" else file_key(key, layout)
        _check_header(reader, source_key, tuple(tensor.shape))
        plan[key] = source_key
    for source in sources.values():
        source.validate()
    return plan


def _read_state(reader, plan: dict[str, str], embed_key: str, device, dtype) -> dict:
    """Pass 2: read exactly the planned tensors, each converted once to dtype on device;
    a tied lm_head is the embedding itself, not a second copy."""
    state = {}
    for key, source_key in plan.items():
        if key == "lm_head.weight" and source_key == embed_key:
            continue
        state[key] = _owned(reader.read(source_key), device, dtype)
    if plan.get("lm_head.weight") == embed_key:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
