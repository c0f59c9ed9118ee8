"""Checkpoint test helpers shared by the loader tests."""

import torch


def foreign_tensors(seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Small stand-ins for the non-thinker weights the real file also holds.

    Real key names (talker, code2wav, audio tower, vision tower) with tiny random tensors,
    for `save_thinker_checkpoint(..., extra_tensors=...)`, so tests can prove the loader
    never reads them. (A test helper: pytest puts tests/ on sys.path.)
    """
    shapes = {
        "talker.model.layers.0.self_attn.q_proj.weight": (16, 8),
        "talker.model.layers.0.mlp.experts.0.gate_proj.weight": (4, 8),
        "talker.codec_head.weight": (12, 8),
        "talker.model.codec_embedding.weight": (12, 8),
        "code2wav.decoder.0.conv.weight": (8, 4, 3),
        "code2wav.upsample.0.0.conv.weight": (8, 8, 2),
        "thinker.audio_tower.layers.0.fc1.weight": (16, 8),
        "thinker.audio_tower.conv2d1.weight": (4, 1, 3, 3),
        "thinker.visual.blocks.0.attn.qkv.weight": (24, 8),
        "thinker.visual.merger.mlp.0.weight": (8, 16),
    }
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def toy_config(**overrides):
    """The tests' toy thinker (2 layers, 8 experts, top-2, hidden 32), with `overrides`."""
    from sage_core.model.config import ThinkerTextConfig

    fields = dict(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=0,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        mrope_section=(3, 3, 2),
    )
    return ThinkerTextConfig(**{**fields, **overrides})
