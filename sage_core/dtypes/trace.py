"""Dtype tracing: where does a floating dtype change, and how far does it travel?"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sage_core.dtypes.boundary import dtype_name, parse_dtype

# --------------------------------------------------------------------------------------
# Dtype tracing: where does a floating dtype change, and how far does it travel?

# Ops recorded by default (normalised names, see `_op_name`). Explicit conversions are
# recorded too, but they are decisions, not promotions (see `CAST_OPS`).
TRACED_OPS = frozenset(
    {
        "outer", "matmul", "bmm", "einsum", "mul", "add", "sub", "div", "neg", "pow",
        "reciprocal", "cat", "cos", "sin", "exp", "softmax", "linear",
        "scaled_dot_product_attention", "to", "float", "double", "half", "bfloat16",
        "type", "type_as",
    }
)  # fmt: skip
CAST_OPS = frozenset({"to", "float", "double", "half", "bfloat16", "type", "type_as"})
_DUNDER = {
    "__mul__": "mul", "__rmul__": "mul", "__matmul__": "matmul", "__rmatmul__": "matmul",
    "__add__": "add", "__radd__": "add", "__sub__": "sub", "__rsub__": "sub",
    "__truediv__": "div", "__rtruediv__": "div", "__neg__": "neg", "__pow__": "pow",
    "__rpow__": "pow",
}  # fmt: skip


def _tensor_dtypes(obj) -> tuple[str, ...]:
    """Dtype names of the tensors in `obj` (nested tuples, lists and dicts), in order."""
    if isinstance(obj, torch.Tensor):
        return (dtype_name(obj.dtype),)
    if isinstance(obj, (tuple, list)):
        return tuple(d for item in obj for d in _tensor_dtypes(item))
    if isinstance(obj, dict):
        return tuple(d for item in obj.values() for d in _tensor_dtypes(item))
    return ()


def _floats(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in names if getattr(torch, n).is_floating_point)


def _op_name(func) -> tuple[str, str]:
    """(short name used for selection, qualified display name) of a torch function."""
    name = getattr(func, "__name__", repr(func))
    short = _DUNDER.get(name, name)
    qualname = getattr(func, "__qualname__", "") or ""
    module = getattr(func, "__module__", "") or ""
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return short, f"Tensor.{short}"
    if module in ("torch._C._nn", "torch.nn.functional"):
        return short, f"F.{short}"
    return short, f"torch.{short}"


@dataclass(frozen=True)
class DtypeEvent:
    """One module call or one torch op, recorded when it finished (or raised)."""

    index: int
    kind: str  # "module" or "op"
    name: str  # module path ("rope", "q_proj") or op ("torch.outer", "Tensor.mul")
    scope: str  # the innermost traced module the event ran in ("" at top level)
    inputs: tuple[str, ...]  # dtype names of every tensor input, in argument order
    outputs: tuple[str, ...]  # dtype names of every tensor output (empty when it raised)
    error: str | None = None  # "RuntimeError: ..." when the call raised

    @property
    def is_cast(self) -> bool:
        return self.kind == "op" and self.name.rsplit(".", 1)[-1] in CAST_OPS

    @property
    def float_inputs(self) -> tuple[str, ...]:
        return _floats(self.inputs)

    @property
    def float_outputs(self) -> tuple[str, ...]:
        return _floats(self.outputs)

    def changes_dtype(self) -> bool:
        """Float inputs and float outputs that are not all one dtype (mixed or converted)."""
        fin, fout = set(self.float_inputs), set(self.float_outputs)
        return bool(fin) and bool(fout) and len(fin | fout) > 1

    def describe(self) -> str:
        where = f" in {self.scope}" if self.scope and self.kind == "op" else ""
        ins = ", ".join(self.inputs) or "-"
        outs = self.error or ", ".join(self.outputs) or "-"
        return f"#{self.index} {self.name}{where}: ({ins}) -> {outs}"


class _OpRecorder(TorchFunctionMode):
    def __init__(self, trace: "DtypeTrace"):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        short, name = _op_name(func)
        if short not in self.trace.ops:
            return func(*args, **kwargs)
        inputs = _tensor_dtypes(args) + _tensor_dtypes(kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            self.trace._record("op", name, inputs, (), f"{type(exc).__name__}: {exc}")
            raise
        self.trace._record("op", name, inputs, _tensor_dtypes(out), None)
        return out


class DtypeTrace:
    """Record the input and output dtypes of modules and selected torch ops, in order.

        with DtypeTrace(model) as trace:
            model(x)
        print(trace.table()); print(trace.summary())

    Module calls are recorded through forward hooks on every submodule of the given
    roots, ops through a `TorchFunctionMode`. Events are numbered in the order they
    *finish*, so an op comes before the module that called it and `first_change()`
    points at the innermost place a dtype changed. A call that raises is recorded
    with its error; leaving the context (normally or by an exception) removes every
    hook and keeps the events.
    """

    def __init__(self, *roots: nn.Module, ops=TRACED_OPS, expected=None):
        for root in roots:
            if not isinstance(root, nn.Module):
                raise TypeError(f"DtypeTrace roots must be nn.Module, got {type(root).__name__}")
        self.roots = roots
        self.ops = frozenset(ops)
        self.expected = parse_dtype(expected) if expected is not None else None
        self.events: list[DtypeEvent] = []
        self._handles = []
        self._scope: list[str] = []
        self._mode = None

    # -- recording -----------------------------------------------------------------
    def _record(self, kind, name, inputs, outputs, error: str | None):
        scope = self._scope[-1] if self._scope else ""
        if kind == "module":
            scope = self._scope[-2] if len(self._scope) > 1 else ""
        self.events.append(
            DtypeEvent(len(self.events), kind, name, scope, tuple(inputs), tuple(outputs), error)
        )

    def _module_names(self):
        for root in self.roots:
            label = type(root).__name__
            for name, module in root.named_modules():
                if len(self.roots) > 1:
                    name = f"{label}.{name}" if name else label
                yield (name or label), module

    def __enter__(self):
        try:
            for name, module in self._module_names():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(
                    module.register_forward_hook(
                        self._post_hook(name), with_kwargs=True, always_call=True
                    )
                )
            self._mode = _OpRecorder(self)
            self._mode.__enter__()
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._mode is not None:
                self._mode.__exit__(exc_type, exc, tb)
        finally:
            self._mode = None
            self._remove_hooks()
        return False  # never swallow the exception

    def _remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scope.clear()

    @property
    def active_hooks(self) -> int:
        return len(self._handles)

    def _pre_hook(self, name):
        def hook(module, args):
            self._scope.append(name)

        return hook

    def _post_hook(self, name):
        def hook(module, args, kwargs, output):
            inputs = _tensor_dtypes(args) + _tensor_dtypes(kwargs)
            # always_call hooks also run when forward raised, with output=None; the
            # error is then the last one recorded inside this call.
            error = None
            if output is None and self.events and self.events[-1].error is not None:
                error = self.events[-1].error
            self._record("module", name, inputs, () if error else _tensor_dtypes(output), error)
            if self._scope and self._scope[-1] == name:
                self._scope.pop()

        return hook

    # -- reading ---------------------------------------------------------------------
    def first_change(self, expected=None, include_casts: bool = False) -> DtypeEvent | None:
        """The first event whose float output differs from its float inputs.

        Explicit conversions (`.to`, `.float()`, ...) are decisions, so they count only
        with `include_casts=True`. With `expected` (here or at construction), an event
        whose float outputs are not all `expected` counts as well.
        """
        expected = parse_dtype(expected) if expected is not None else self.expected
        want = dtype_name(expected) if expected is not None else None
        for event in self.events:
            if event.is_cast and not include_casts:
                continue
            if event.changes_dtype():
                return event
            if want is not None and any(d != want for d in event.float_outputs):
                return event
        return None

    def first_error(self) -> DtypeEvent | None:
        return next((e for e in self.events if e.error is not None), None)

    def promotion_path(self) -> list[DtypeEvent]:
        """The first change, then every later op carrying its dtype, up to the first error."""
        start = self.first_change()
        if start is None:
            return []
        promoted = set(start.float_outputs) - set(start.float_inputs) or set(start.float_outputs)
        path = [start]
        for event in self.events[start.index + 1 :]:
            if event.kind == "op" and promoted & set(event.float_inputs):
                path.append(event)
            if event.error is not None:
                if path[-1] is not event:
                    path.append(event)
                break
        return path

    def summary(self) -> str:
        """A few lines: where the dtype changed, what carried it, where it failed."""
        start = self.first_change()
        if start is None:
            return "no floating dtype change" + (
                f"; first error: {self.first_error().describe()}" if self.first_error() else ""
            )
        path = self.promotion_path()
        lines = [f"dtype changes at {start.describe()}"]
        carried = [e for e in path[1:] if e.error is None]
        if carried:
            lines.append("carried by: " + " -> ".join(_short(e) for e in carried))
        failed = self.first_error()
        if failed is not None:
            lines.append(f"fails at {failed.describe()}")
        return "\n".join(lines)

    def table(self, kinds=("module", "op")) -> str:
        """A fixed-width text table of the events (deterministic: dtypes and names only)."""
        rows = [("#", "kind", "name", "scope", "inputs", "outputs", "note")]
        first = self.first_change()
        for e in self.events:
            if e.kind not in kinds:
                continue
            note = "raised" if e.error else ("FIRST CHANGE" if e is first else "")
            if not note and e.changes_dtype():
                note = "cast" if e.is_cast else "changes"
            outs = ", ".join(e.outputs) if not e.error else e.error.split(":")[0]
            rows.append((str(e.index), e.kind, e.name, e.scope, ", ".join(e.inputs), outs, note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )


def _short(event: DtypeEvent) -> str:
    return f"{event.name}@{event.scope}" if event.kind == "op" and event.scope else event.name


DTYPE_COLOURS = {
    "float32": "#4C72B0",
    "float64": "#C44E52",
    "bfloat16": "#55A868",
    "float16": "#DD8452",
}
_OTHER_COLOUR = "#BBBBBB"  # integer and bool tensors


def plot_dtype_flow(traces, kinds=("op",), title=None):
    """One panel per trace: each event a row, its input and output dtypes as coloured cells.

    `traces` is a DtypeTrace or a {label: DtypeTrace} dict. The first change is shaded,
    a call that raised is marked. Returns the matplotlib figure (export it with
    `sage_core.notebook.figures.save_figure`).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if isinstance(traces, DtypeTrace):
        traces = {"": traces}
    rows = {label: [e for e in t.events if e.kind in kinds] for label, t in traces.items()}
    height = max(len(r) for r in rows.values()) * 0.3 + 1.4
    fig, axes = plt.subplots(1, len(traces), figsize=(5.2 * len(traces), height), squeeze=False)
    for ax, (label, trace) in zip(axes[0], traces.items(), strict=True):
        events, first = rows[label], trace.first_change()
        for row, event in enumerate(events):
            y = -row
            if event is first:
                ax.add_patch(Rectangle((-0.1, y - 0.5), 7.2, 1.0, color="#F2D16B", zorder=0))
            for col, name in enumerate(event.inputs[:3]):
                colour = DTYPE_COLOURS.get(name, _OTHER_COLOUR)
                ax.add_patch(Rectangle((col, y - 0.35), 0.8, 0.7, color=colour))
            ax.annotate("", (4.0, y), (3.0, y), arrowprops={"arrowstyle": "->", "lw": 0.8})
            if event.error is not None:
                ax.text(4.2, y, "raised " + event.error.split(":")[0], va="center", fontsize=8,
                        color="#C44E52", fontweight="bold")  # fmt: skip
            for col, name in enumerate(event.outputs[:2]):
                colour = DTYPE_COLOURS.get(name, _OTHER_COLOUR)
                ax.add_patch(Rectangle((4.2 + col, y - 0.35), 0.8, 0.7, color=colour))
            where = f" ({event.scope})" if event.scope else ""
            ax.text(-0.3, y, f"#{event.index} {event.name}{where}", ha="right", va="center",
                    fontsize=8)  # fmt: skip
        ax.set_xlim(-0.2, 7.2)
        ax.set_ylim(-len(events) + 0.4, 1.2)
        ax.text(1.4, 0.85, "inputs", ha="center", fontsize=8)
        ax.text(5.1, 0.85, "outputs", ha="center", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    legend = [Patch(color=c, label=n) for n, c in DTYPE_COLOURS.items()]
    legend += [Patch(color=_OTHER_COLOUR, label="integer"),
               Patch(color="#F2D16B", label="first dtype change")]  # fmt: skip
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
