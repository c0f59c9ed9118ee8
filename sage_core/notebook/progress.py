"""Progress bars for long work that still leave byte-identical notebook outputs.

In a terminal the bar is tqdm's usual one, on stderr. Elsewhere (a notebook kernel, CI logs)
the elapsed time and rate are left out: they change on every run, and a notebook's final bar
line is committed output. In a notebook kernel the bar goes to stdout: JupyterLab redraws a
stream on each carriage return, so the bar updates in place as progress, and the runner (like
nbval) keeps only what a terminal would show, the final line, as ordinary output rather than
a red stderr box.
"""

import sys

from tqdm import tqdm

STABLE_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt}"


def in_notebook_kernel() -> bool:
    """Whether this code runs inside a Jupyter kernel (not a terminal IPython, not plain Python)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and shell is not False and hasattr(shell, "kernel")


def progress(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`: a time-free bar unless stderr is a terminal, written to
    stdout inside a notebook kernel and to stderr elsewhere."""
    kernel = in_notebook_kernel()
    if kernel or not sys.stderr.isatty():
        kwargs.setdefault("bar_format", STABLE_BAR_FORMAT)
        kwargs.setdefault("ascii", True)
    kwargs.setdefault("file", sys.stdout if kernel else sys.stderr)
    return tqdm(iterable, **kwargs)
