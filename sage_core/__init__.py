"""sage_core: the thin library behind the sage-dtype-trust notebooks."""

from sage_core.errors import CheckpointError

__all__ = ["CheckpointError", "load_thinker", "generate", "perplexity"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import sage_core` stays cheap for the runner and notebooks 01-02.
    if name == "load_thinker":
        from sage_core.checkpoint import load_thinker

        return load_thinker
    if name in ("generate", "perplexity"):
        from sage_core.model import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'sage_core' has no attribute {name!r}")
