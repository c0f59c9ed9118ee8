"""Checkpoints: safetensors reading, key layouts, experts on demand (cache policies, routing
traces, cache-aware selectors), loading, saving, memory."""

from sage_core.checkpoint.cache_policy import POLICIES, make_policy, simulate, simulate_belady
from sage_core.checkpoint.cache_selectors import CacheAwareSelector, NextLayerPrefetch
from sage_core.checkpoint.expert_trace import RoutingTrace, TraceRecorder, access_sequence
from sage_core.checkpoint.experts import ExpertCache, ExpertSource, OnDemandExperts
from sage_core.checkpoint.layout import detect_layout
from sage_core.checkpoint.load import load_thinker
from sage_core.checkpoint.memory import memory_estimate
from sage_core.checkpoint.reader import SafetensorsReader
from sage_core.checkpoint.save import save_thinker_checkpoint

__all__ = [
    "POLICIES",
    "CacheAwareSelector",
    "ExpertCache",
    "ExpertSource",
    "NextLayerPrefetch",
    "OnDemandExperts",
    "RoutingTrace",
    "SafetensorsReader",
    "TraceRecorder",
    "access_sequence",
    "detect_layout",
    "load_thinker",
    "make_policy",
    "memory_estimate",
    "save_thinker_checkpoint",
    "simulate",
    "simulate_belady",
]
