from sage_core.notebook.cli import main

raise SystemExit(main())
