"""Shared test helpers."""

import nbformat
import pytest


@pytest.fixture
def make_notebook(tmp_path):
    """Write a small notebook under tmp_path and return its path.

    `cells` are code sources; the first is tagged "parameters" unless `parameters=False`.
    The kernelspec is the project's, as in the committed notebooks.
    """

    def make(name, cells, parameters=True, directory=None):
        code = [nbformat.v4.new_code_cell(source) for source in cells]
        if parameters and code:
            code[0].metadata["tags"] = ["parameters"]
        nb = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_markdown_cell(f"# {name}"), *code],
            metadata={
                "kernelspec": {
                    "display_name": "sage-dtype-trust",
                    "language": "python",
                    "name": "sage-dtype-trust",
                }
            },
        )
        for i, cell in enumerate(nb.cells):  # stable ids, so reruns compare byte for byte
            cell.id = f"{name}-{i}"
        path = (directory or tmp_path) / f"{name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        return path

    return make
