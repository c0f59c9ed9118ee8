"""Headline numbers recorded in a notebook's outputs and read back."""

import json
import math

import nbformat
import numpy as np
import pytest
import torch

from sage_core.notebook import headline


def notebook_with(*bundles):
    outputs = [nbformat.v4.new_output("display_data", data=b) for b in bundles]
    cell = nbformat.v4.new_code_cell("x", outputs=outputs, execution_count=1)
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("m"), cell])


def test_round_trip_through_a_written_notebook(tmp_path):
    nb = notebook_with(
        headline.bundle(recovery=np.float32(0.5), seeds=np.int64(10), ok=True),
        {"text/plain": "not a headline"},
        headline.bundle(recovery=torch.tensor(0.75), name="noise"),
    )
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    assert headline.read(path) == {"recovery": 0.75, "seeds": 10, "ok": True, "name": "noise"}


def test_plain_text_says_what_was_recorded():
    text = headline.bundle(ppl_change=-0.25)["text/plain"]
    assert text == "headline: ppl_change = -0.25"


@pytest.mark.parametrize(
    ("value", "error"),
    [(math.nan, ValueError), (math.inf, ValueError), ([1, 2], TypeError), (np.ones(3), TypeError)],
)
def test_bad_values_are_refused_by_name(value, error):
    with pytest.raises(error, match="'bad'"):
        headline.bundle(bad=value)


def test_nothing_to_record_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        headline.bundle()


def test_record_displays_the_bundle_raw(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append((a, k)))
    headline.record(recovery=0.5)
    assert shown == [((headline.bundle(recovery=0.5),), {"raw": True})]


def test_the_payload_is_text_that_a_javascript_round_trip_leaves_alone():
    payload = headline.bundle(whole=1.0, tiny=1.2e-05)[headline.MIME_TYPE]
    assert isinstance(payload, str)  # Lab would rewrite numbers inside a JSON object
    assert json.loads(payload) == {"whole": 1.0, "tiny": 1.2e-05}
