"""Memory arithmetic: what a thinker, its experts and a bounded cache take, by dtype."""

import torch

from sage_core.checkpoint.load import _check_resident_bound
from sage_core.dtypes import parse_dtype
from sage_core.model.config import ThinkerTextConfig, select_layers


def memory_estimate(
    config: ThinkerTextConfig,
    dtype=torch.bfloat16,
    *,
    layers=None,
    max_resident_experts=None,
) -> dict:
    """Bytes of the thinker's weights by part, in `dtype` (what `load_thinker` holds).

    Keys: bytes_per_expert, num_experts_total, experts (all of them), attention_norms_router
    (attention, q/k norms, layer norms, router, final norm), dense_mlp, embeddings_lm_head,
    thinker (the sum). With `layers` / `max_resident_experts` (as for load_thinker) it adds
    `resident`: what that load keeps in memory, with the expert cache full.
    """
    size = parse_dtype(dtype).itemsize
    c = config
    hidden, head_dim = c.hidden_size, c.head_dim
    per_expert = 3 * hidden * c.moe_intermediate_size * size
    attention = (
        hidden * c.num_attention_heads * head_dim * 2  # q_proj, o_proj
        + hidden * c.num_key_value_heads * head_dim * 2  # k_proj, v_proj
        + 2 * head_dim  # q_norm, k_norm
        + 2 * hidden  # input and post-attention layer norms
    ) * size
    router = c.num_experts * hidden * size
    dense_mlp = 3 * hidden * c.intermediate_size * size
    embeddings = c.vocab_size * hidden * size * (1 if c.tie_word_embeddings else 2)

    def part_bytes(indices, experts_cap=None):
        sparse = [i for i in indices if c.is_sparse(i)]
        n_experts = len(sparse) * c.num_experts
        if experts_cap is not None:
            n_experts = min(n_experts, experts_cap)
        return {
            "num_experts_total": len(sparse) * c.num_experts,
            "experts": n_experts * per_expert,
            "attention_norms_router": len(indices) * attention
            + len(sparse) * router
            + hidden * size,
            "dense_mlp": (len(indices) - len(sparse)) * dense_mlp,
        }

    whole = part_bytes(range(c.num_hidden_layers))
    out = {"bytes_per_expert": per_expert, **whole, "embeddings_lm_head": embeddings}
    out["thinker"] = (
        whole["experts"] + whole["attention_norms_router"] + whole["dense_mlp"] + embeddings
    )
    if layers is not None or max_resident_experts is not None:
        _check_resident_bound(max_resident_experts)
        chosen = part_bytes(select_layers(layers, c.num_hidden_layers), max_resident_experts)
        out["resident"] = (
            chosen["experts"] + chosen["attention_norms_router"] + chosen["dense_mlp"] + embeddings
        )
    return out
