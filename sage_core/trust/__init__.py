"""Trust-augmented expert selection: the trust table, its selector and learners, the context classifier."""

from sage_core.trust.classifier import ContextClassifier
from sage_core.trust.learners import (
    LEARNERS,
    AblationSelector,
    AttributionLearner,
    CounterfactualLearner,
    LearnedBiasLearner,
    LearnedBiasSelector,
    attribution_estimates,
    continuation_nll,
)
from sage_core.trust.table import (
    REPORT_PRIOR,
    OracleSelector,
    TrustLearner,
    TrustSelector,
    TrustStateError,
    TrustTable,
    dense_routing,
    excluding_top_k,
)

__all__ = [
    "LEARNERS",
    "REPORT_PRIOR",
    "AblationSelector",
    "AttributionLearner",
    "ContextClassifier",
    "CounterfactualLearner",
    "LearnedBiasLearner",
    "LearnedBiasSelector",
    "OracleSelector",
    "TrustLearner",
    "TrustSelector",
    "TrustStateError",
    "TrustTable",
    "attribution_estimates",
    "continuation_nll",
    "dense_routing",
    "excluding_top_k",
]
