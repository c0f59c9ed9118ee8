"""Checkpoints: safetensors reading, key layouts, experts on demand, loading, saving, memory."""

from sage_core.checkpoint.experts import ExpertCache, ExpertSource, OnDemandExperts
from sage_core.checkpoint.layout import detect_layout
from sage_core.checkpoint.load import load_thinker
from sage_core.checkpoint.memory import memory_estimate
from sage_core.checkpoint.reader import SafetensorsReader
from sage_core.checkpoint.save import save_thinker_checkpoint

__all__ = [
    "ExpertCache",
    "ExpertSource",
    "OnDemandExperts",
    "SafetensorsReader",
    "detect_layout",
    "load_thinker",
    "memory_estimate",
    "save_thinker_checkpoint",
]
