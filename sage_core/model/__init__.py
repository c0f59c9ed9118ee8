"""The Q3-Omni thinker: config, rotary embedding, attention, mixture of experts, generation, tokenizers."""
