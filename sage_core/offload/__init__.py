"""Offload: which experts are resident and why. Cache policies (online ones, a learned reuse
predictor, Belady and its bounds) and their simulator, routing traces, and the selectors that
know about the cache (next-layer prefetch, cache-aware routing).

The loader (`sage_core.checkpoint`) keeps loading: its `ExpertCache` holds the weights and
asks a policy from this room which expert to evict.
"""

from sage_core.offload.cache_policy import POLICIES, make_policy, simulate, simulate_belady
from sage_core.offload.cache_selectors import CacheAwareSelector, NextLayerPrefetch, RouterFeed
from sage_core.offload.expert_trace import RoutingTrace, TraceRecorder, access_sequence

__all__ = [
    "POLICIES",
    "CacheAwareSelector",
    "NextLayerPrefetch",
    "RouterFeed",
    "RoutingTrace",
    "TraceRecorder",
    "access_sequence",
    "make_policy",
    "simulate",
    "simulate_belady",
]
