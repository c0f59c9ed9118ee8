# The two commands: `make run` (execute every notebook in place) and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lab bench lint clean-venv

$(PY):
	$(shell command -v $(PYTHON) || echo python3) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name sage-dtype-trust --display-name "sage-dtype-trust (.venv)" >/dev/null
	$(PY) -c "import matplotlib.pyplot" >/dev/null 2>&1  # build the font cache outside any notebook
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m sage_core run

lint: $(STAMP)
	$(PY) -m ruff check sage_core tests benchmarks
	$(PY) -m ruff format --check sage_core tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest tests -m "not slow" -q
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-kernel-name sage-dtype-trust -q -p no:cacheprovider

lab: $(STAMP)
	$(PY) -m sage_core.notebook.lab

bench: $(STAMP)
	$(PY) -m benchmarks

clean-venv:
	rm -rf $(VENV)
