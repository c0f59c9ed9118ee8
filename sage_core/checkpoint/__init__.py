"""Checkpoints: safetensors reading, key layouts, experts on demand (the expert cache; its
policies, routing traces and cache-aware selectors live in `sage_core.offload` and are
re-exported here for old imports), loading, saving, memory."""

from sage_core.checkpoint.experts import ExpertCache, ExpertSource, OnDemandExperts
from sage_core.checkpoint.layout import detect_layout
from sage_core.checkpoint.load import load_thinker
from sage_core.checkpoint.memory import memory_estimate
from sage_core.checkpoint.reader import SafetensorsReader
from sage_core.checkpoint.save import save_thinker_checkpoint
from sage_core.offload import (
    POLICIES,
    CacheAwareSelector,
    NextLayerPrefetch,
    RoutingTrace,
    TraceRecorder,
    access_sequence,
    make_policy,
    simulate,
    simulate_belady,
)

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
