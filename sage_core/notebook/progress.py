"""Progress bars for long work that still leave byte-identical notebook outputs.

In a terminal the bar is tqdm's usual one. Elsewhere (a notebook kernel, CI logs) the
elapsed time and rate are left out: they change on every run, and a notebook's final
bar line is committed output.
"""

import sys

from tqdm import tqdm

STABLE_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt}"


def progress(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`, with a time-free bar unless stderr is a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("bar_format", STABLE_BAR_FORMAT)
        kwargs.setdefault("ascii", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
