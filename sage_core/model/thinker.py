"""The Qwen3-Omni thinker, text path: embeddings, decoder stack, final norm, lm head.

Module names follow the checkpoint keys one to one (minus the leading `thinker.`), so
`state_dict()` is the checkpoint's key space. A model may hold only some of the
layers (`layer_indices`, the report's "selective" model); each keeps its original index
for the KV cache, the selector hook and routing traces.
"""

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from sage_core.model.attention import (
    Attention,
    ModelKVCache,
    RMSNorm,
    chunk_mask,
    static_decode_mask,
)
from sage_core.model.config import ThinkerTextConfig, select_layers
from sage_core.model.moe import DenseMLP, ExpertSelector, RouterTopK, SparseMoeBlock
from sage_core.model.rope import MultimodalRotaryEmbedding

INIT_STD = 0.02  # transformers' initializer_range for this model


class DecoderLayer(nn.Module):
    def __init__(self, config: ThinkerTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config)
        if config.is_sparse(layer_idx):
            self.mlp = SparseMoeBlock(config, layer_idx)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.mlp, SparseMoeBlock)

    def forward(self, x, cos, sin, kv_cache=None, input_pos=0, mask=None):
        """x (B, S, H) -> (x, router logits (B*S, E) or None for a dense layer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, input_pos, mask)
        h = self.post_attention_layernorm(x)
        if self.is_sparse:
            h, router_logits = self.mlp(h)
        else:
            h, router_logits = self.mlp(h), None
        return x + h, router_logits


class ThinkerTextModel(nn.Module):
    """The `model.` part of the checkpoint."""

    def __init__(self, config: ThinkerTextConfig, layer_indices: list[int]):
        super().__init__()
        # `_weight` skips nn.Embedding's own init; init_weights() sets every weight.
        self.embed_tokens = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in layer_indices})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MultimodalRotaryEmbedding(
            config.head_dim, config.rope_theta, config.mrope_section, config.mrope_interleaved
        )


class Qwen3OmniThinker(nn.Module):
    def __init__(
        self,
        config: ThinkerTextConfig,
        layer_indices: Sequence[int] | None = None,
        with_lm_head: bool = True,
    ):
        super().__init__()
        self.config = config
        self.layer_indices = select_layers(
            layer_indices, config.num_hidden_layers, name="layer_indices"
        )
        self.model = ThinkerTextModel(config, self.layer_indices)
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if with_lm_head else None
        )
        # On the meta device (the loader's skeleton) there is nothing to initialise, and
        # normal_ there imports torch's Python meta kernels (sympy included), a large RSS cost.
        if not self.model.embed_tokens.weight.is_meta:
            self.init_weights()
        if self.lm_head is not None and config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = INIT_STD, generator: torch.Generator | None = None):
        """transformers' initialisation: normal(0, std) weights, RMSNorm weights at one."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, SparseMoeBlock) and hasattr(module.experts, "gate_up_proj"):
                module.experts.gate_up_proj.normal_(0.0, std, generator=generator)
                module.experts.down_proj.normal_(0.0, std, generator=generator)

    # --- routing hooks -------------------------------------------------------------

    def sparse_blocks(self) -> dict[int, SparseMoeBlock]:
        """{original layer index: MoE block} for the sparse layers held."""
        return {
            i: self.model.layers[str(i)].mlp
            for i in self.layer_indices
            if self.model.layers[str(i)].is_sparse
        }

    def set_selector(self, selector: ExpertSelector | None) -> None:
        """Route every sparse layer through `selector` (None: the model's own RouterTopK)."""
        if selector is None:
            selector = RouterTopK(self.config.num_experts_per_tok, self.config.norm_topk_prob)
        if not callable(selector):
            raise ValueError(f"selector must be callable or None, got {type(selector).__name__}")
        for block in self.sparse_blocks().values():
            object.__setattr__(block, "selector", selector)

    @contextlib.contextmanager
    def routing_trace(self):
        """Record every sparse layer's choice: {layer_idx: [(indices, weights), ...]} on CPU,
        one entry per forward call."""
        blocks = self.sparse_blocks()
        previous = {i: b.trace for i, b in blocks.items()}
        trace = {i: [] for i in blocks}
        for i, block in blocks.items():
            object.__setattr__(block, "trace", trace[i])
        try:
            yield trace
        finally:
            for i, block in blocks.items():
                object.__setattr__(block, "trace", previous[i])

    # --- forward -------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> ModelKVCache:
        """An empty KV cache for `batch` sequences of at most `max_len` positions."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"batch and max_len must be positive, got {batch}, {max_len}")
        weight = self.model.embed_tokens.weight
        return ModelKVCache(
            self.layer_indices,
            batch,
            max_len,
            self.config.num_key_value_heads,
            self.config.head_dim,
            weight.device,
            weight.dtype,
        )

    def _decode(self, input_ids, position_ids=None, cache: ModelKVCache | None = None):
        """-> (hidden states after the final norm (B, S, H), tuple of router logits)."""
        B, S = self._check_inputs(input_ids, position_ids, cache)
        input_pos = cache.length if cache is not None else 0
        x = self.model.embed_tokens(input_ids)  # (B, S, H)
        if position_ids is None:
            positions = torch.arange(input_pos, input_pos + S, device=x.device)
            position_ids = positions.expand(B, S)  # (B, S)
        cos, sin = self.model.rotary_emb(x, position_ids)  # each (B, S, head_dim)
        mask = chunk_mask(input_pos, S, x.device)
        router_logits = []
        for i in self.layer_indices:
            kv_cache = cache[i] if cache is not None else None
            x, logits = self.model.layers[str(i)](x, cos, sin, kv_cache, input_pos, mask)
            if logits is not None:
                router_logits.append(logits)
        return self.model.norm(x), tuple(router_logits)

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, cache: ModelKVCache):
        """One decode step with shapes that never change between tokens (what
        `torch.compile` wraps; sage_core.model.decode drives it).

        token (B, 1) int64, input_pos (1,) int64 the position it takes, `cache` filled
        before input_pos -> (logits (B, vocab), `bad`: 0-d bool, True if a selector chose
        an expert out of range). No host sync: the inputs are checked by the caller, the
        cache is read whole under a mask, and the MoE gathers its experts' weights.
        """
        B = token.shape[0]
        x = self.model.embed_tokens(token)  # (B, 1, H)
        cos, sin = self.model.rotary_emb(x, input_pos.expand(B, 1))  # each (B, 1, head_dim)
        mask = static_decode_mask(input_pos, cache.max_len)  # (1, 1, 1, max_len)
        bad = torch.zeros((), dtype=torch.bool, device=x.device)
        for i in self.layer_indices:
            layer = self.model.layers[str(i)]
            h = layer.input_layernorm(x)
            x = x + layer.self_attn.forward_static(h, cos, sin, cache[i], input_pos, mask)
            h = layer.post_attention_layernorm(x)
            if layer.is_sparse:
                h, layer_bad = layer.mlp.forward_static(h)
                bad = bad | layer_bad
            else:
                h = layer.mlp(h)
            x = x + h
        return self.lm_head(self.model.norm(x))[:, -1], bad  # (B, vocab), ()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        output_router_logits: bool = False,
        cache: ModelKVCache | None = None,
    ):
        """Logits (B, S, vocab); with output_router_logits, (logits, router logits per
        sparse layer in layer order, each (B*S, E))."""
        if self.lm_head is None:
            raise ValueError(
                "this checkpoint has no lm_head (a bare text model); use hidden_states()"
            )
        hidden, router_logits = self._decode(input_ids, position_ids, cache)
        logits = self.lm_head(hidden)
        return (logits, router_logits) if output_router_logits else logits

    def hidden_states(self, input_ids, position_ids=None, cache: ModelKVCache | None = None):
        """Hidden states after the final norm, (B, S, H)."""
        return self._decode(input_ids, position_ids, cache)[0]

    def _check_inputs(self, input_ids, position_ids, cache):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
            raise ValueError(f"input_ids must be a (B, S) tensor, got shape {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.numel() == 0:
            raise ValueError(
                f"input_ids must be a non-empty int64 tensor, got {input_ids.dtype} "
                f"of shape {tuple(input_ids.shape)}"
            )
        lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one host sync
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                f"got values in [{lo}, {hi}]"
            )
        B, S = input_ids.shape
        if position_ids is not None:
            shape = tuple(position_ids.shape)
            if shape not in ((B, S), (3, B, S)):
                raise ValueError(
                    f"position_ids must be (B, S) = {(B, S)} or (3, B, S) = {(3, B, S)}, "
                    f"got {shape}"
                )
        if cache is not None:
            if cache.batch != B:
                raise ValueError(f"cache holds batch {cache.batch}, input_ids has batch {B}")
            if cache.length + S > cache.max_len:
                raise ValueError(
                    f"cache of max_len {cache.max_len} holds {cache.length} positions; "
                    f"{S} more do not fit"
                )
            missing = set(self.layer_indices) - set(cache)
            if missing:
                raise ValueError(f"cache has no entries for layers {sorted(missing)}")
        return B, S
