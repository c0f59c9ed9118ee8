"""One module per notebook, named after it; repro/ holds the pre-fix code paths of notebooks 01-02."""
