"""`python -m sage_core.corpus [--out DIR | --write-snapshot]`: regenerate the corpus."""

from sage_core.corpus.build import main

raise SystemExit(main())
