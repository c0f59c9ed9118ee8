"""Benchmarks of sage_core's Qwen3-Omni thinker (`python -m benchmarks`, `make bench`).

Every figure is a ratio against a reference run measured in the same process on the
same weights: transformers' reference model (each CPU experts implementation), its
`generate`, and a per-token, per-expert Python loop (the original design). Peak RSS
with a bounded expert cache is measured in fresh subprocesses, one per setting.
Absolute times on a shared machine are noise; they are shown only for context.
"""
