"""The public API of `sage_core`: names, signatures, and a cheap `import sage_core`."""

import importlib
import inspect
import json
import re
import subprocess
import sys

import pytest
import torch

import sage_core
from sage_core.paths import ROOT


def test_the_four_names_of_the_issue_keep_their_signatures():
    from sage_core import CheckpointError, generate, load_thinker, perplexity

    assert issubclass(CheckpointError, Exception)
    # The original parameters, in order, with their defaults; later additions only as
    # keywords with defaults, so every existing call keeps working.
    params = list(inspect.signature(load_thinker).parameters.values())
    original = "(path, layers=None, max_resident_experts=None, device='cpu', dtype={})"
    assert str(inspect.Signature(params[:5])) == original.format(torch.float32)
    assert all(p.default is not inspect.Parameter.empty for p in params[5:])
    params = list(inspect.signature(generate).parameters.values())
    assert str(inspect.Signature(params[:6])) == (
        "(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None)"
    )
    assert all(p.default is not inspect.Parameter.empty for p in params[6:])  # e.g. compile
    assert list(inspect.signature(perplexity).parameters) == [
        "model",
        "token_ids",
        "window",
        "stride",
    ]


@pytest.mark.parametrize("name", sage_core.__all__)
def test_every_public_name_resolves_to_its_defining_object(name):
    home = sage_core._LAZY.get(name, "sage_core.errors")
    assert getattr(sage_core, name) is getattr(importlib.import_module(home), name)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no_such_name"):
        sage_core.no_such_name  # noqa: B018


def test_import_sage_core_loads_neither_torch_nor_sklearn():
    code = "import sys, sage_core; print(sorted({'torch', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_names_notebooks_import_from_sage_core_are_public():
    imported = set()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            source = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
            for names in re.findall(r"^from sage_core import \(?([^)\n]+)", source, re.M):
                imported |= {n.strip() for n in names.split(",") if n.strip()}
    assert imported, "no notebook imports from sage_core: the check would be vacuous"
    assert imported <= set(sage_core.__all__)
