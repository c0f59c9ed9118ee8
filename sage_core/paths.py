"""Project path constants, so no notebook depends on its working directory."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FIGURES = ROOT / "figures"
MODELS = ROOT / "models"
DATA = ROOT / "data"
RESULTS = ROOT / "results"
TABLES = ROOT / "tables"  # committed outputs of studies too long for a notebook (tuning, sweeps)
