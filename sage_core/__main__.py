from sage_core.cli import main

raise SystemExit(main())
