"""The reference runs sage_core is measured against, all on the model's own weight tensors.

- `TransformersThinker`: transformers' `Qwen3OmniMoeThinkerForConditionalGeneration`, whose
  text model is `Qwen3OmniMoeThinkerTextModel`, with one experts implementation. Its
  parameters are assigned the very tensors of our loaded model (no copy), so both sides
  run on the same weights by construction; the expert stacks alone may be given as
  row-major copies (`row_major_experts`), the layout transformers' own loader builds,
  where ours stores each expert transposed. The thinker class is used, not a wrapper,
  because it is what accepts `generate()` in transformers 5.23; its audio and vision
  towers are built at a token size and never run on text input.
- `loop_logits`: our model's forward with the MoE computed the original way, one token
  and one of its top-k experts at a time.
"""

import contextlib
import copy

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_omni
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerConfig,
)

from sage_core.model import moe
from sage_core.model.config import nested_config_dict

# Token-sized towers: the thinker class insists on having them, text input never runs them.
TINY_AUDIO = dict(
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=8,
    d_model=8,
    downsample_hidden_size=8,
    num_mel_bins=8,
)
TINY_VISION = dict(
    depth=1,
    hidden_size=8,
    intermediate_size=8,
    num_heads=2,
    deepstack_visual_indexes=[0],
    num_position_embeddings=16,
)
# The real thinker config carries it; transformers 5.23's config class lacks a default and
# generate() with an attention mask reads it (get_rope_index).
VISION_START_TOKEN_ID = 151652


def experts_implementations() -> list[str]:
    """Every experts implementation transformers registers, eager first."""
    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


class TransformersThinker:
    """transformers' thinker on the weights of `model` (a sage_core Qwen3OmniThinker)."""

    def __init__(
        self, model, experts_implementation: str, experts: dict | None = None, attention="sdpa"
    ):
        """`experts`: {model key: tensor} replacing the expert stacks (same values).
        `attention`: transformers' attention implementation; "sdpa", its default, is what
        a user gets and what sage_core itself uses."""
        text = nested_config_dict(model.config)["thinker_config"]["text_config"]
        hidden = model.config.hidden_size
        config = Qwen3OmniMoeThinkerConfig(
            text_config=copy.deepcopy(text),
            audio_config=dict(TINY_AUDIO, output_dim=hidden),
            vision_config=dict(TINY_VISION, out_hidden_size=hidden),
        )
        config.vision_start_token_id = VISION_START_TOKEN_ID
        config._attn_implementation = attention
        with torch.device("meta"):
            thinker = hf_omni.Qwen3OmniMoeThinkerForConditionalGeneration(config)
        state = {
            "model.language_model." + key.removeprefix("model."): tensor
            for key, tensor in model.state_dict().items()
            if key.startswith("model.")
        }
        for key, tensor in (experts or {}).items():
            state["model.language_model." + key.removeprefix("model.")] = tensor
        state["lm_head.weight"] = model.lm_head.weight
        result = thinker.load_state_dict(state, strict=False, assign=True)
        text_missing = [k for k in result.missing_keys if k.startswith("model.language_model.")]
        if text_missing or result.unexpected_keys:
            raise RuntimeError(
                f"transformers thinker does not match the checkpoint: missing {text_missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        # The unused towers get storage (never read); the text rotary table is rebuilt
        # on CPU, since its buffers are not part of any state dict.
        thinker.model.audio_tower.to_empty(device="cpu")
        thinker.model.visual.to_empty(device="cpu")
        thinker.model.language_model.rotary_emb = hf_omni.Qwen3OmniMoeThinkerTextRotaryEmbedding(
            thinker.config.text_config
        )
        thinker.set_experts_implementation(experts_implementation)
        thinker.generation_config.eos_token_id = None  # always generate the full length
        thinker.generation_config.pad_token_id = 0
        self.thinker = thinker.eval()
        self.experts_implementation = experts_implementation

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefill through the text model and the lm head, (B, S, vocab)."""
        hidden = self.thinker.model.language_model(input_ids=input_ids).last_hidden_state
        return self.thinker.lm_head(hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Greedy generation with transformers' own KV cache, exactly `max_new_tokens`
        (kwargs: more generate() options, e.g. cache_implementation="static")."""
        return self.thinker.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )


def row_major_experts(model) -> dict:
    """Row-major copies of the model's expert stacks: the memory layout transformers'
    own loader produces (it stacks per-expert tensors), same values."""
    return {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    }


def loop_expert_mix(block, h: torch.Tensor, experts: dict | None = None) -> torch.Tensor:
    """The original MoE: for each token, for each of its top-k experts, run that expert.

    `experts`: {model key: stack} to take the weights from (e.g. `row_major_experts`, the
    layout of the original per-expert nn.Linear weights) instead of the block's own."""
    flat = h.reshape(-1, h.shape[-1])
    router_logits = F.linear(flat, block.gate.weight)
    indices, weights = block.selector(router_logits, block.layer_idx, flat)
    if experts is None:
        expert = block.experts.expert
    else:
        prefix = f"model.layers.{block.layer_idx}.mlp.experts."
        gate_ups, downs = experts[prefix + "gate_up_proj"], experts[prefix + "down_proj"]

        def expert(e):
            return gate_ups[e], downs[e]

    out = torch.zeros_like(flat)
    for t, (token_experts, token_weights) in enumerate(zip(indices.tolist(), weights)):
        for e, w in zip(token_experts, token_weights):
            gate_up, down = expert(e)
            gate, up = F.linear(flat[t], gate_up).chunk(2)
            out[t] += w * F.linear(F.silu(gate) * up, down)
    return out.view_as(h)


@torch.no_grad()
def loop_logits(model, input_ids: torch.Tensor, experts: dict | None = None) -> torch.Tensor:
    """Our model's prefill with `loop_expert_mix` in place of its grouped experts."""
    B, S = input_ids.shape
    x = model.model.embed_tokens(input_ids)
    positions = torch.arange(S, device=x.device).expand(B, S)
    cos, sin = model.model.rotary_emb(x, positions)
    for i in model.layer_indices:
        layer = model.model.layers[str(i)]
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
        h = layer.post_attention_layernorm(x)
        x = x + (loop_expert_mix(layer.mlp, h, experts) if layer.is_sparse else layer.mlp(h))
    return model.lm_head(model.model.norm(x))


@contextlib.contextmanager
def experts_through_loop():
    """sage_core's multi-token MoE path is its per-expert Python loop (`grouped_expert_mix`)
    while inside, as where torch._grouped_mm is not used: the design before it."""
    previous = moe.GROUPED_MM_DEVICES
    moe.GROUPED_MM_DEVICES = ()
    try:
        yield
    finally:
        moe.GROUPED_MM_DEVICES = previous
