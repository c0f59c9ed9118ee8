"""Trust-augmented expert selection: the trust table, its selector and learners, the context classifier."""

from sage_core.trust.classifier import ContextClassifier
from sage_core.trust.table import (
    REPORT_PRIOR,
    TrustLearner,
    TrustSelector,
    TrustStateError,
    TrustTable,
    dense_routing,
)

__all__ = [
    "REPORT_PRIOR",
    "ContextClassifier",
    "TrustLearner",
    "TrustSelector",
    "TrustStateError",
    "TrustTable",
    "dense_routing",
]
