"""Strict mode: every floating dtype decision outside the deliberate sites is an error."""

import sys

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sage_core.dtypes.boundary import FLOAT_DTYPES, dtype_name, parse_dtype
from sage_core.dtypes.trace import _op_name
from sage_core.errors import DtypePolicyError

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
    "sage_core.model.attention.RMSNorm.forward": ("norm statistics", FLOAT32_ONLY),
    "sage_core.model.rope.MultimodalRotaryEmbedding.forward": ("RoPE tables", FLOAT32_ONLY),
    "sage_core.model.rope.rope_inv_freq": ("RoPE tables", FLOAT32_ONLY),
    "sage_core.model.moe.load_balancing_loss": ("router probabilities", FLOAT32_ONLY),
    "sage_core.model.generation._next_token": ("sampling softmax", FLOAT32_ONLY),
    "sage_core.model.generation.perplexity": (
        "loss: log-softmax over the vocabulary",
        FLOAT32_ONLY,
    ),
    "sage_core.dtypes.boundary.to_numpy_float32": (
        "scikit-learn boundary: float32 numpy",
        FLOAT32_ONLY,
    ),
    "sage_core.studies.experiments.score_continuation": (
        "loss: log-softmax over the vocabulary",
        FLOAT32_ONLY,
    ),
    # Trust is learning state (per layer, context, expert), float32 by design like the
    # classifier's centres; it meets activations only as selection weights, which the
    # selector casts to the hidden states' dtype.
    "sage_core.trust.table.TrustSelector.__call__": (
        "router probabilities and trust",
        FLOAT32_ONLY,
    ),
    "sage_core.trust.table.TrustTable.__init__": ("trust state", FLOAT32_ONLY),
    "sage_core.trust.table.TrustTable.load": ("trust state read from its file", FLOAT32_ONLY),
    "sage_core.trust.state.load_state": (
        "trust and classifier state read from its file",
        FLOAT32_ONLY,
    ),
    "sage_core.trust.table.TrustTable.credit": ("trust state", FLOAT32_ONLY),
    "sage_core.trust.table.dense_routing": ("routing weights as trust state", FLOAT32_ONLY),
    "sage_core.checkpoint.reader.SafetensorsReader.read": (
        "checkpoint bytes in the file's dtype, converted at once by the loader",
        ANY_FLOAT,
    ),
}
FLOAT32_SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax"})

_NUMPY_FLOATS = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}  # fmt: skip


def _leaves(obj):
    """Everything in `obj` that is not a tuple, list or dict (nested), in order."""
    if isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _leaves(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _leaves(item)
    else:
        yield obj


def _is_float_tensor(obj) -> bool:
    return isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.device.type != "meta"


def _float_dtypes_of(obj) -> list:
    """torch dtypes of the floating tensors and numpy arrays in `obj` (nested), in order."""
    return [
        leaf.dtype if isinstance(leaf, torch.Tensor) else _NUMPY_FLOATS[leaf.dtype]
        for leaf in _leaves(obj)
        if _is_float_tensor(leaf) or (isinstance(leaf, np.ndarray) and leaf.dtype in _NUMPY_FLOATS)
    ]


def _tensor_float_inputs(args, kwargs) -> set:
    """dtypes of the floating *tensors* among the inputs. Numpy arrays do not count:
    crossing into torch is a boundary, and what comes out of it must follow the policy."""
    return {leaf.dtype for leaf in _leaves((args, kwargs)) if _is_float_tensor(leaf)}


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
        outputs = set(_float_dtypes_of(out))
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
