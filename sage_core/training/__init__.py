"""Training the embedded default model (models/q3omni-tiny)."""
