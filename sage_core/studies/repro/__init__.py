"""PRE-FIX CODE PATHS, kept only to reproduce the two dtype bugs of the report.

Nothing in sage_core imports this package; only notebooks and tests do (a test
enforces that). Each module reproduces one bug exactly as it was written:

- `sage_core.studies.repro.rope_buffer`: bug #1, a RoPE `inv_freq` buffer restored as float64.
- `sage_core.studies.repro.sklearn_boundary`: bug #2, scikit-learn turning torch tensors into float64.
"""
