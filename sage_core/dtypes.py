"""Dtype boundary helpers.

Every crossing between torch, numpy and scikit-learn goes through these, so the
dtype on each side is a decision written in one place rather than a library default.
"""

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

FLOAT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch float dtype or its name ("bfloat16", "torch.float32", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        # Only the four dtypes the models compute in: float8 is "floating point" to torch
        # but has no matmul, so accepting it here would crash deep inside a forward.
        if dtype not in FLOAT_DTYPES.values():
            raise ValueError(
                f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype} "
                "(a floating point dtype the models compute in)"
            )
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "fp64": "float64"}.get(
            name, name
        )
        if name in FLOAT_DTYPES:
            return FLOAT_DTYPES[name]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")


def to_numpy_float32(x) -> np.ndarray:
    """torch tensor (any float dtype, any device) or array-like -> contiguous float32 numpy.

    This is the fix for bug #2: scikit-learn does not read torch dtypes, and an
    array it builds itself from a tensor or a list is float64.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def to_torch_like(x, like: torch.Tensor) -> torch.Tensor:
    """numpy or tensor -> tensor on `like`'s device with `like`'s dtype (never a hard-coded one).

    Converted in one step: no intermediate float64 tensor from a float64 array or a list.
    """
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
            rows.append(
                (str(e.index), e.kind, e.name, e.scope, ", ".join(e.inputs), outs, note)
            )
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
    `sage_core.figures.save_figure`).
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


# --------------------------------------------------------------------------------------
# Strict mode: raise at the first op that breaks the dtype policy.
#
# THE DTYPE POLICY (the one place it is written down; `strict()` enforces it):
#
# 1. Every floating tensor an op makes is in the activation dtype.
# 2. float32 is allowed besides, where it is deliberate: at the call sites listed in
#    DELIBERATE_SITES (norm statistics, RoPE tables, sampling and loss softmax, the
#    float32 numpy handed to scikit-learn, float32 trust state), and as the explicit
#    `dtype=torch.float32` of a softmax-family op (FLOAT32_SOFTMAX_OPS) anywhere: that
#    is how the router's probabilities are recognised, in RouterTopK and in any selector.
# 3. float64 is never allowed unless it is the activation dtype. (The one exception is
#    reading a checkpoint: its bytes arrive in the file's dtype, whatever that is, and the
#    loader converts them at once; see DELIBERATE_SITES.)
# 4. An op whose floating inputs all have one dtype and whose output keeps it *carries*
#    that dtype; it does not break the policy again. The break is reported where the
#    dtype was made: a promotion (`torch.outer(float32, float64)`), a creation in the
#    wrong dtype (`torch.tensor(scores)`, `.float()`, `torch.as_tensor(float64 array)`)
#    or a crossing to numpy (`Tensor.__array__(dtype=float64)`, what scikit-learn does
#    to a torch tensor). So a float64 buffer moved with `.to(device)` is not the error;
#    the op that first mixes it with float32 activations is.
# 5. Tensors on the meta device hold no data and are ignored.
#
# A site is the innermost Python frame outside torch that called the op, named
# "module.qualname". Recognising sites by where the code is, not by dtype patterns,
# means an explicit `.to(torch.float32)` anywhere else (a hard-coded dtype, bug #2) is
# still an error, and the library needs no markers in its code.

FLOAT32_ONLY = frozenset({torch.float32})
ANY_FLOAT = frozenset(FLOAT_DTYPES.values())
DELIBERATE_SITES = {
    "sage_core.attention.RMSNorm.forward": ("norm statistics", FLOAT32_ONLY),
    "sage_core.rope.MultimodalRotaryEmbedding.forward": ("RoPE tables", FLOAT32_ONLY),
    "sage_core.rope.rope_inv_freq": ("RoPE tables", FLOAT32_ONLY),
    "sage_core.moe.load_balancing_loss": ("router probabilities", FLOAT32_ONLY),
    "sage_core.generation._next_token": ("sampling softmax", FLOAT32_ONLY),
    "sage_core.generation.perplexity": ("loss: log-softmax over the vocabulary", FLOAT32_ONLY),
    "sage_core.dtypes.to_numpy_float32": ("scikit-learn boundary: float32 numpy", FLOAT32_ONLY),
    "sage_core.experiments.score_continuation": ("loss: log-softmax over the vocabulary",
                                                 FLOAT32_ONLY),
    # Trust is learning state (per layer, context, expert), float32 by design like the
    # classifier's centres; it meets activations only as selection weights, which the
    # selector casts to the hidden states' dtype.
    "sage_core.trust.TrustSelector.__call__": ("router probabilities and trust", FLOAT32_ONLY),
    "sage_core.trust.TrustTable.__init__": ("trust state", FLOAT32_ONLY),
    "sage_core.trust.TrustTable.load": ("trust state read from its file", FLOAT32_ONLY),
    "sage_core.trust.TrustTable.credit": ("trust state", FLOAT32_ONLY),
    "sage_core.trust.dense_routing": ("routing weights as trust state", FLOAT32_ONLY),
    "sage_core.checkpoint.SafetensorsReader.read": (
        "checkpoint bytes in the file's dtype, converted at once by the loader",
        ANY_FLOAT,
    ),
}
FLOAT32_SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax"})

_NUMPY_FLOATS = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}  # fmt: skip


class DtypePolicyError(TypeError):
    """An op broke the dtype policy. Names the op, where it ran and the dtypes involved."""

    def __init__(self, op, where, inputs, output, activation, rule):
        self.op, self.where, self.rule = op, where, rule
        self.inputs, self.output, self.activation = tuple(inputs), output, activation
        ins = ", ".join(inputs) or "no float inputs"
        super().__init__(
            f"{op} in {where}: ({ins}) -> {output} breaks the dtype policy "
            f"(activation dtype {activation}): {rule}"
        )


def _float_dtypes_of(obj, out: list) -> list:
    """torch dtypes of the floating tensors and numpy arrays in `obj` (nested), in order."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.device.type != "meta":
            out.append(obj.dtype)
    elif isinstance(obj, np.ndarray):
        if obj.dtype in _NUMPY_FLOATS:
            out.append(_NUMPY_FLOATS[obj.dtype])
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _float_dtypes_of(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _float_dtypes_of(item, out)
    return out


def _tensor_float_inputs(args, kwargs) -> set:
    """dtypes of the floating *tensors* among the inputs. Numpy arrays do not count:
    crossing into torch is a boundary, and what comes out of it must follow the policy."""
    tensors = []
    _collect_tensors((args, kwargs), tensors)
    return {t.dtype for t in tensors if t.is_floating_point() and t.device.type != "meta"}


def _collect_tensors(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect_tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect_tensors(item, out)


class _StrictMode(TorchFunctionMode):
    def __init__(self, policy: "strict"):
        super().__init__()
        self.policy = policy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Fast path: most ops return a tensor in the activation dtype or a non-float.
        if isinstance(out, torch.Tensor):
            if out.dtype == self.policy.activation or not out.is_floating_point():
                return out
        elif not isinstance(out, (np.ndarray, tuple, list)):
            return out
        try:
            self.policy._check(func, args, kwargs, out)
        except DtypePolicyError as error:
            # torch turns a TypeError raised inside a binary operator (`a * b`) into
            # NotImplemented, and Python then raises its own "unsupported operand" TypeError.
            # Keep ours; strict.__exit__ puts it back in place of that one.
            if self.policy.pending is None:
                self.policy.pending = error
            raise
        return out


_OWN_CODE: set = set()  # code objects of strict mode itself, skipped when naming a call site


def _call_site(frame):
    """The innermost frame that is neither torch's nor strict mode's own."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if frame.f_code not in _OWN_CODE and not (module == "torch" or module.startswith("torch.")):
            return frame
        frame = frame.f_back
    return None


def _site_name(frame) -> str:
    if frame is None:
        return "<top level>"
    # A comprehension or nested function belongs to the function that defines it.
    qualname = frame.f_code.co_qualname.split(".<locals>.", 1)[0]
    return f"{frame.f_globals.get('__name__', '?')}.{qualname}"


class strict:  # noqa: N801 (a context manager used like a function: `with strict(): ...`)
    """Raise `DtypePolicyError` at the first op whose output breaks the dtype policy.

        with strict(torch.bfloat16, model=model):
            model(input_ids)

    `activation_dtype`: the dtype activations must be in; None takes the dtype of
    `model`'s first floating parameter, or torch's default dtype without a model. With
    `model`, errors name the submodule path (`model.layers.0.self_attn`) and entering
    checks that every floating parameter is in the activation dtype.

    Works through one `TorchFunctionMode`, pushed on enter and popped on exit; nothing is
    installed globally and no module is wrapped or hooked, so outside the context the
    cost is zero. The policy itself is the comment block above DELIBERATE_SITES.

    Two things torch and library code do to a raised error: torch turns a TypeError inside
    a binary operator (`a * b`) into Python's "unsupported operand" TypeError, which
    `__exit__` replaces with the DtypePolicyError; and a caller may wrap it (e.g. in a
    CheckpointError), where it stays the `__cause__` and its message names the op.
    """

    def __init__(self, activation_dtype=None, model: nn.Module | None = None):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"strict(model=...) must be an nn.Module, got {type(model).__name__}")
        if activation_dtype is None:
            params = [p for p in model.parameters() if p.is_floating_point()] if model else []
            activation_dtype = params[0].dtype if params else torch.get_default_dtype()
        self.activation = parse_dtype(activation_dtype)
        self.model = model
        self._mode = None
        self.pending: DtypePolicyError | None = None  # the first violation, see __exit__

    def __enter__(self):
        if self.model is not None:
            for name, param in self.model.named_parameters():
                if param.is_floating_point() and param.dtype != self.activation:
                    raise DtypePolicyError(
                        "parameter", name, (), dtype_name(param.dtype),
                        dtype_name(self.activation), "model weights must be in the activation dtype",
                    )  # fmt: skip
        self.pending = None
        self._mode = _StrictMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(exc_type, exc, tb)
        pending, self.pending = self.pending, None
        if (
            pending is not None
            and isinstance(exc, TypeError)
            and not isinstance(exc, DtypePolicyError)
        ):
            # The violation came out of a binary operator as Python's "unsupported
            # operand" TypeError: raise ours instead, with the traceback of that one,
            # which points at the offending line.
            raise pending.with_traceback(tb) from exc
        return False

    @property
    def active(self) -> bool:
        return self._mode is not None

    def allowed(self, dtype: torch.dtype, site: str, op: str, args, kwargs) -> bool:
        """Rules 1 to 3 of the policy for an op that made a tensor of `dtype`."""
        if dtype == self.activation:
            return True
        if dtype == torch.float32 and op in FLOAT32_SOFTMAX_OPS:
            requested = kwargs.get("dtype", args[2] if len(args) > 2 else None)
            if requested == torch.float32:
                return True
        entry = DELIBERATE_SITES.get(site)
        return entry is not None and dtype in entry[1]

    def _check(self, func, args, kwargs, out) -> None:
        outputs = set(_float_dtypes_of(out, []))
        outputs.discard(self.activation)
        if not outputs:
            return
        inputs = _tensor_float_inputs(args, kwargs)
        short, display = _op_name(func)
        for dtype in sorted(outputs, key=str):
            if inputs == {dtype}:  # rule 4: carried, not made here
                continue
            frame = _call_site(sys._getframe(1))
            site = _site_name(frame)
            if self.allowed(dtype, site, short, args, kwargs):
                continue
            raise DtypePolicyError(
                display, self._where(frame, site), sorted(map(dtype_name, inputs)),
                dtype_name(dtype), dtype_name(self.activation), self._rule(dtype, inputs),
            )  # fmt: skip

    def _rule(self, dtype, inputs) -> str:
        if len(inputs) > 1:
            how = "silent promotion of mixed dtypes"
        elif inputs:
            how = "conversion"
        else:
            how = "created"
        if dtype == torch.float64:
            return f"{how} to float64, which is never allowed unless it is the activation dtype"
        if dtype == torch.float32:
            return f"{how} to float32 outside a deliberate float32 site (see DELIBERATE_SITES)"
        return f"{how} to {dtype_name(dtype)}, which is not the activation dtype"

    def _where(self, frame, site: str) -> str:
        """`site`, with the nn.Module whose forward is running (its path under `model`)."""
        f = frame
        while f is not None:
            owner = f.f_locals.get("self") if f.f_code.co_name == "forward" else None
            if isinstance(owner, nn.Module):
                label = type(owner).__name__
                if self.model is not None:
                    path = next((n for n, m in self.model.named_modules() if m is owner), None)
                    if path is not None:
                        label = f"{path or type(self.model).__name__} ({label})"
                return f"{label}, called from {site}"
            f = f.f_back
        return site


_OWN_CODE.update(
    {
        _StrictMode.__torch_function__.__code__,
        strict._check.__code__,
        strict.allowed.__code__,
    }
)
