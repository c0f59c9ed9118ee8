"""sage_core: the thin library behind the sage-dtype-trust notebooks.

The public API, one import away (`from sage_core import load_thinker, generate`); each name
is imported on first use, so `import sage_core` itself loads neither torch nor scikit-learn.
"""

from sage_core.errors import (
    CheckpointError,
    ClassifierStateError,
    DtypePolicyError,
    RunError,
    TrustStateError,
)

# public name -> the module that defines it
_LAZY = {
    # the model and its checkpoints
    "ThinkerTextConfig": "sage_core.model.config",
    "read_config": "sage_core.model.config",
    "Qwen3OmniThinker": "sage_core.model.thinker",
    "generate": "sage_core.model.generation",
    "perplexity": "sage_core.model.generation",
    "ByteTokenizer": "sage_core.model.tokenizer",
    "load_tokenizer": "sage_core.model.tokenizer",
    "load_thinker": "sage_core.checkpoint.load",
    "save_thinker_checkpoint": "sage_core.checkpoint.save",
    "memory_estimate": "sage_core.checkpoint.memory",
    # dtypes: the boundary helpers, the trace, strict mode
    "parse_dtype": "sage_core.dtypes.boundary",
    "to_numpy_float32": "sage_core.dtypes.boundary",
    "to_torch_like": "sage_core.dtypes.boundary",
    "DtypeTrace": "sage_core.dtypes.trace",
    "strict": "sage_core.dtypes.strict_mode",
    # trust-augmented selection and the corpus
    "TrustTable": "sage_core.trust",
    "TrustSelector": "sage_core.trust",
    "TrustLearner": "sage_core.trust",
    "ContextClassifier": "sage_core.trust",
    "CONTEXTS": "sage_core.corpus",
    "load_corpus": "sage_core.corpus",
}

__all__ = [
    "CheckpointError",
    "ClassifierStateError",
    "DtypePolicyError",
    "RunError",
    "TrustStateError",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sage_core' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
