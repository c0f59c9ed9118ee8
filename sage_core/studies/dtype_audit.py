"""The dtype audit matrix: every entry point, in every dtype combination, under `strict()`.

A cell is (entry point, activation dtype, checkpoint). Its run loads a tiny random model
from a checkpoint written by `save_thinker_checkpoint` (weights in bfloat16, float32 or
float64, or float32 with a float64 `rotary_emb.inv_freq` stored beside them), runs the
entry point inside `sage_core.dtypes.strict_mode.strict`, and asserts the dtype of what comes out on
both sides of every library boundary (torch -> numpy -> scikit-learn -> torch).

Each cell's expected outcome is declared in `expectation()`, with the reason:

- "policy": the run and every intermediate op follow the dtype policy (strict() raised
  nothing) and every output has its declared dtype;
- "rejected": the library refuses the input up front with a documented ValueError or
  TypeError (an activation dtype nothing computes in);
- "skipped": the combination does not exist (numpy has no bfloat16, float16 matmuls on a
  CPU without them), with the reason.

What a run can end in besides: "violation" (strict() raised DtypePolicyError), "wrong
dtype" (an output had another dtype) and "crash" (any other exception). Shared by
tests/test_dtype_audit.py (one test per cell) and notebook 08 (the figure).
"""

import contextlib
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sage_core.checkpoint import load_thinker, save_thinker_checkpoint
from sage_core.dtypes import FLOAT_DTYPES, DtypePolicyError, strict, to_torch_like
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.generation import generate, perplexity
from sage_core.model.rope import MultimodalRotaryEmbedding, rope_inv_freq
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.trust.classifier import ContextClassifier

# Small enough that the whole matrix runs in seconds; one dense and one sparse layer so
# both MLP paths, the router and the expert cache all run.
AUDIT_CONFIG = ThinkerTextConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=24,
    moe_intermediate_size=16,
    num_experts=4,
    num_experts_per_tok=2,
    mrope_section=(2, 1, 1),
    mlp_only_layers=(0,),
)
ACTIVATIONS = ("float32", "bfloat16", "float64", "float16")
UNSUPPORTED = "float8_e4m3fn"  # floating point to torch, but no model computes in it
ROPE_BUFFER = "float32 + float64 inv_freq"
CHECKPOINTS = ("bfloat16", "float32", "float64", ROPE_BUFFER)
ANY_CHECKPOINT = "any"
ROPE_BUFFER_KEY = "thinker.model.rotary_emb.inv_freq"
CONTEXTS = ("code", "reasoning")
BATCH, SEQ, NEW_TOKENS = 4, 6, 3
RESIDENT_EXPERTS = 2  # bound for the on-demand expert cache (the sparse layer has 4)

OUTCOMES = ("policy", "rejected", "skipped", "violation", "wrong dtype", "crash")


class AuditMismatch(AssertionError):
    """An output of a cell does not have the dtype (or value) the cell declares."""


@dataclass(frozen=True)
class Cell:
    entry: str
    activation: str
    checkpoint: str

    @property
    def column(self) -> str:
        return f"{self.activation} / {self.checkpoint}"

    @property
    def id(self) -> str:
        return f"{self.entry} | activations {self.activation} | checkpoint {self.checkpoint}"


@dataclass(frozen=True)
class Expectation:
    outcome: str  # "policy", "rejected" or "skipped"
    reason: str
    error: type | None = None  # for "rejected": the exception type
    match: str | None = None  # for "rejected": a regex its message must match
    bug: str | None = None  # a known bug in another module: xfail(strict=True) in the test


@dataclass(frozen=True)
class Result:
    cell: Cell
    outcome: str
    detail: str
    error: BaseException | None = None

    def meets(self, expected: Expectation) -> bool:
        if self.outcome != expected.outcome:
            return False
        if expected.outcome == "rejected":
            return isinstance(self.error, expected.error) and bool(
                re.search(expected.match, str(self.error))
            )
        return True


@dataclass(frozen=True)
class Context:
    """What a cell's run gets: its dtypes, the checkpoint directory, a scratch directory."""

    activation: torch.dtype
    checkpoint: str
    checkpoint_dir: Path | None
    workdir: Path
    device: str = "cpu"
    seed: int = 0

    @property
    def policy_dtype(self) -> bool:
        return self.activation in FLOAT_DTYPES.values()


# -- what a machine supports ------------------------------------------------------------------


def float16_support(device="cpu") -> tuple[bool, str]:
    """(supported, reason): probe the ops the model runs, in float16, on `device`."""
    try:
        x = torch.ones(2, 4, 3, 8, dtype=torch.float16, device=device)
        F.scaled_dot_product_attention(x, x, x, is_causal=True)
        F.linear(x, torch.ones(8, 8, dtype=torch.float16, device=device))
        torch.softmax(x, -1, dtype=torch.float32)
        rows = x.reshape(-1, 8)
        torch.zeros_like(rows).index_add_(0, torch.arange(rows.shape[0], device=device), rows)
        torch.rsqrt(x.to(torch.float32)).to(torch.float16)
    except (RuntimeError, NotImplementedError) as exc:
        return False, f"float16 is not supported on {device}: {type(exc).__name__}: {exc}"
    return True, f"float16 matmul, attention and index_add_ run on {device}"


# -- the tiny checkpoints ---------------------------------------------------------------------


def write_checkpoints(directory, config: ThinkerTextConfig = AUDIT_CONFIG, seed: int = 0):
    """One seeded random model saved in every CHECKPOINTS variant -> {name: directory}."""
    model = Qwen3OmniThinker(config)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    state = model.state_dict()
    table64 = rope_inv_freq(config.head_dim, config.rope_theta).to(torch.float64)
    paths = {}
    for name in CHECKPOINTS:
        weights = "float32" if name == ROPE_BUFFER else name
        extra = {ROPE_BUFFER_KEY: table64} if name == ROPE_BUFFER else None
        out = Path(directory) / name.replace(" ", "_").replace("+", "and")
        paths[name] = save_thinker_checkpoint(
            state, config, out, dtype=weights, num_shards=2, extra_tensors=extra
        )
    return paths


def input_ids(config: ThinkerTextConfig = AUDIT_CONFIG, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)


# -- helpers of the entry points --------------------------------------------------------------


def _expect(name: str, value, dtype) -> None:
    got = value.dtype
    if isinstance(value, np.ndarray):
        dtype = np.dtype(dtype)
    if got != dtype:
        raise AuditMismatch(f"{name} is {got}, expected {dtype}")


def _policy(ctx: Context, model=None):
    """strict() for the cell's activation dtype. An unsupported dtype has no policy: the
    library alone must refuse it, so its code runs bare (and a refusal is its own)."""
    if not ctx.policy_dtype:
        return contextlib.nullcontext()
    return strict(ctx.activation, model=model)


def _load(ctx: Context, **kwargs):
    with _policy(ctx):
        model = load_thinker(ctx.checkpoint_dir, dtype=ctx.activation, device=ctx.device, **kwargs)
    if not ctx.policy_dtype:
        raise AuditMismatch(f"load_thinker accepted dtype={ctx.activation}")
    return model


def _ids(ctx: Context) -> torch.Tensor:
    return input_ids(seed=ctx.seed).to(ctx.device)


def _hidden(ctx: Context, model) -> torch.Tensor:
    with _policy(ctx, model):
        hidden = model.hidden_states(_ids(ctx))
    _expect("hidden_states", hidden, ctx.activation)
    return hidden


def _numpy_in_activation_dtype(ctx: Context, hidden: torch.Tensor) -> np.ndarray:
    with _policy(ctx):
        array = hidden.detach().cpu().numpy()
    _expect("numpy hidden states", array, np.dtype(str(ctx.activation).removeprefix("torch.")))
    return array


def _fit(ctx: Context, features) -> ContextClassifier:
    with _policy(ctx):
        classifier = ContextClassifier(len(CONTEXTS), list(CONTEXTS), seed=ctx.seed).fit(features)
    _expect("classifier centres", classifier.centers_, np.float32)
    return classifier


def _predict(ctx: Context, classifier: ContextClassifier, features, like: torch.Tensor) -> None:
    with _policy(ctx):
        assigned = classifier.predict(features)
        # ... and back into torch: the assignment as an index, the centres as activations.
        assigned_t = torch.as_tensor(assigned, device=like.device)
        centres_t = to_torch_like(classifier.centers_, like)
    _expect("predicted contexts", assigned, np.int64)
    _expect("contexts back in torch", assigned_t, torch.int64)
    _expect("centres back in torch", centres_t, like.dtype)


def _trust_table(model, seed: int):
    from sage_core.trust import TrustTable

    table = TrustTable.for_model(model, list(CONTEXTS))
    gen = torch.Generator().manual_seed(seed)
    table.trust += torch.randn(table.trust.shape, generator=gen)  # not neutral: trust acts
    return table


# -- the entry points -------------------------------------------------------------------------


def run_rope(ctx: Context) -> None:
    """The rotary embedding alone, its buffer assigned in the checkpoint's dtype (what
    `load_state_dict(..., assign=True)` leaves)."""
    cfg = AUDIT_CONFIG
    rope = MultimodalRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    buffer = torch.float64 if ctx.checkpoint == ROPE_BUFFER else getattr(torch, ctx.checkpoint)
    rope.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(buffer)
    x = torch.zeros(2, SEQ, cfg.hidden_size, dtype=ctx.activation, device=ctx.device)
    with _policy(ctx):
        cos, sin = rope(x, torch.arange(SEQ, device=ctx.device).expand(3, 2, SEQ))
    _expect("cos", cos, ctx.activation)
    _expect("sin", sin, ctx.activation)


def run_forward(ctx: Context) -> None:
    model = _load(ctx)
    with _policy(ctx, model):
        logits, router = model(_ids(ctx), output_router_logits=True)
    _expect("logits", logits, ctx.activation)
    for i, r in enumerate(router):
        _expect(f"router logits {i}", r, ctx.activation)


def run_hidden_states(ctx: Context) -> None:
    model = _load(ctx)
    positions = torch.arange(SEQ, device=ctx.device).expand(3, BATCH, SEQ)  # M-RoPE ids
    with _policy(ctx, model):
        hidden = model.hidden_states(_ids(ctx), position_ids=positions)
    _expect("hidden_states", hidden, ctx.activation)


def run_generate(ctx: Context) -> None:
    model = _load(ctx)
    with _policy(ctx, model):
        greedy = generate(model, _ids(ctx), NEW_TOKENS)
        sampled = generate(model, _ids(ctx), NEW_TOKENS, temperature=0.8, top_p=0.9, seed=0)
    for name, out in (("greedy tokens", greedy), ("sampled tokens", sampled)):
        _expect(name, out, torch.int64)
        if out.shape != (BATCH, SEQ + NEW_TOKENS):
            raise AuditMismatch(f"{name} have shape {tuple(out.shape)}")


def run_perplexity(ctx: Context) -> None:
    model = _load(ctx)
    with _policy(ctx, model):
        result = perplexity(model, _ids(ctx)[0], window=4, stride=2)
    if not (isinstance(result.perplexity, float) and np.isfinite(result.perplexity)):
        raise AuditMismatch(f"perplexity is {result.perplexity!r}, expected a finite float")


def run_experts_on_demand(ctx: Context) -> None:
    model = _load(ctx, max_resident_experts=RESIDENT_EXPERTS)
    with _policy(ctx, model):
        logits = model(_ids(ctx))
    _expect("logits", logits, ctx.activation)
    cache = model.expert_cache
    if cache.misses == 0:
        raise AuditMismatch("no expert was read on demand")
    blocks = model.sparse_blocks()
    for layer, expert in cache.keys():
        gate_up, down = blocks[layer].experts.expert(expert)
        _expect(f"cached expert {layer}.{expert} gate_up", gate_up, ctx.activation)
        _expect(f"cached expert {layer}.{expert} down", down, ctx.activation)


def run_classifier_fit_torch(ctx: Context) -> None:
    hidden = _hidden(ctx, _load(ctx))
    _fit(ctx, hidden)


def run_classifier_fit_numpy(ctx: Context) -> None:
    hidden = _hidden(ctx, _load(ctx))
    _fit(ctx, _numpy_in_activation_dtype(ctx, hidden))


def run_classifier_predict_torch(ctx: Context) -> None:
    hidden = _hidden(ctx, _load(ctx))
    _predict(ctx, _fit(ctx, hidden), hidden, hidden)


def run_classifier_predict_numpy(ctx: Context) -> None:
    hidden = _hidden(ctx, _load(ctx))
    array = _numpy_in_activation_dtype(ctx, hidden)
    _predict(ctx, _fit(ctx, array), array, hidden)


def run_trust_select(ctx: Context) -> None:
    """Both rules of the selector, plugged into the model's routing hook."""
    from sage_core.trust import TrustSelector

    model = _load(ctx)
    table = _trust_table(model, ctx.seed)
    for rule in ("bias", "report"):
        selector = TrustSelector.for_model(model, table, rule=rule)
        selector.context = CONTEXTS[0]
        model.set_selector(selector)
        try:
            with _policy(ctx, model), model.routing_trace() as trace:
                logits = model(_ids(ctx))
        finally:
            model.set_selector(None)
        _expect(f"logits ({rule} rule)", logits, ctx.activation)
        for layer, calls in trace.items():
            _expect(f"selection weights layer {layer} ({rule} rule)", calls[0][1], ctx.activation)


def run_trust_update(ctx: Context) -> None:
    """Score a real continuation teacher-forced with routing, then credit the experts used."""
    from sage_core.studies.experiments import Sample, score_continuation
    from sage_core.trust import TrustLearner, TrustSelector

    model = _load(ctx)
    table = _trust_table(model, ctx.seed)
    before = table.trust.clone()
    selector = TrustSelector.for_model(model, table)
    selector.context = CONTEXTS[0]
    ids = _ids(ctx).cpu()[0]
    sample = Sample(CONTEXTS[0], "audit", 0, 0, ids[:3], ids[3:])
    model.set_selector(selector)
    try:
        with _policy(ctx, model):
            nll, routing = score_continuation(model, sample, with_routing=True)
            TrustLearner(table).update(CONTEXTS[0], nll, routing)
            TrustLearner(table).update(CONTEXTS[0], nll * 0.5, routing)  # a better generation
    finally:
        model.set_selector(None)
    _expect("token NLL", nll, torch.float32)  # a metric: float32 whatever the activations
    _expect("trust", table.trust, torch.float32)  # learning state, float32 by design
    if torch.equal(before, table.trust):
        raise AuditMismatch("the update did not change any trust value")


def run_trust_save(ctx: Context) -> None:
    from safetensors import safe_open

    table = _trust_table(_load(ctx), ctx.seed)
    with _policy(ctx):
        path = table.save(ctx.workdir / "trust.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    if set(stored.values()) != {"F32"}:
        raise AuditMismatch(f"trust file holds {stored}, expected float32 (F32) only")


def run_trust_load(ctx: Context) -> None:
    from sage_core.trust import TrustSelector, TrustTable

    model = _load(ctx)
    table = _trust_table(model, ctx.seed)
    path = table.save(ctx.workdir / "trust.safetensors")
    with _policy(ctx):
        loaded = TrustTable.load(path, config_hash=model.config.config_hash())
    _expect("loaded trust", loaded.trust, torch.float32)
    if not torch.equal(loaded.trust, table.trust):
        raise AuditMismatch("the loaded trust differs from the saved one")
    selector = TrustSelector.for_model(model, loaded)  # and it drives the model as before
    selector.context = CONTEXTS[0]
    model.set_selector(selector)
    try:
        with _policy(ctx, model):
            logits = model(_ids(ctx))
    finally:
        model.set_selector(None)
    _expect("logits with the loaded trust", logits, ctx.activation)


ENTRY_POINTS: dict[str, Callable[[Context], None]] = {
    "rope": run_rope,
    "forward": run_forward,
    "hidden_states": run_hidden_states,
    "generate": run_generate,
    "perplexity": run_perplexity,
    "experts on demand": run_experts_on_demand,
    "classifier fit (torch)": run_classifier_fit_torch,
    "classifier fit (numpy)": run_classifier_fit_numpy,
    "classifier predict (torch)": run_classifier_predict_torch,
    "classifier predict (numpy)": run_classifier_predict_numpy,
    "trust select": run_trust_select,
    "trust update": run_trust_update,
    "trust save": run_trust_save,
    "trust load": run_trust_load,
}
MODEL_FREE = {"rope"}
CLASSIFIER_ENTRIES = {e for e in ENTRY_POINTS if e.startswith("classifier")}


# -- the matrix and its declared outcomes -----------------------------------------------------


def cells() -> list[Cell]:
    """Every cell: rows are entry points, columns activation x checkpoint (plus the
    unsupported activation dtype, where no checkpoint is ever read)."""
    columns = [(a, c) for a in ACTIVATIONS for c in CHECKPOINTS] + [(UNSUPPORTED, ANY_CHECKPOINT)]
    return [Cell(entry, a, c) for entry in ENTRY_POINTS for a, c in columns]


def expectation(cell: Cell, float16: tuple[bool, str] | None = None) -> Expectation:
    """The declared outcome of a cell, with its reason. `float16`: `float16_support()`."""
    if cell.activation == UNSUPPORTED:
        if cell.entry in MODEL_FREE or cell.entry in CLASSIFIER_ENTRIES:
            return Expectation(
                "skipped",
                "no model computes in float8, so there are no such activations to feed it; "
                "load_thinker refuses the dtype (the model rows)",
            )
        return Expectation(
            "rejected",
            "load_thinker refuses a dtype no model computes in, before reading any weight",
            ValueError,
            r"dtype must be one of \['bfloat16', 'float16', 'float32', 'float64'\]",
        )
    if cell.activation == "float16":
        supported, reason = float16 if float16 is not None else float16_support()
        if not supported:
            return Expectation("skipped", reason)
    if cell.activation == "bfloat16" and cell.entry.endswith("(numpy)"):
        return Expectation(
            "skipped",
            "numpy has no bfloat16; bfloat16 tensors reach the classifier as torch tensors "
            "(the torch rows) and cross to numpy only through to_numpy_float32",
        )
    reasons = {
        "rope": "tables computed in float32 whatever the buffer's dtype, cast to the activations",
        "experts on demand": "experts read from the file's dtype straight into the activation dtype",
        "trust update": "trust is float32 learning state; activations stay in their dtype",
        "trust save": "trust is stored as float32, whatever the activations",
        "trust load": "float32 trust in, selection weights in the activation dtype out",
    }
    reason = reasons.get(cell.entry, "activations in the activation dtype, float32 only at "
                         "the deliberate sites")  # fmt: skip
    if cell.entry in CLASSIFIER_ENTRIES:
        reason = "float32 numpy at the scikit-learn boundary; int64 contexts and centres in the " \
            "activation dtype on the way back"  # fmt: skip
    return Expectation("policy", reason)


def run_cell(cell: Cell, checkpoints: dict | None, workdir=None, device="cpu", seed=0,
             float16: tuple[bool, str] | None = None) -> Result:  # fmt: skip
    """Run one cell and say how it ended. `checkpoints`: `write_checkpoints()`'s dict."""
    expected = expectation(cell, float16)
    if expected.outcome == "skipped":
        return Result(cell, "skipped", expected.reason)
    checkpoint_dir = None
    if checkpoints is not None:
        # The unsupported column must be refused before any weight is read: any file will do.
        name = next(iter(checkpoints)) if cell.checkpoint == ANY_CHECKPOINT else cell.checkpoint
        checkpoint_dir = Path(checkpoints[name])
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_thread())
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory())
        ctx = Context(getattr(torch, cell.activation), cell.checkpoint, checkpoint_dir,
                      Path(workdir), device, seed)  # fmt: skip
        try:
            ENTRY_POINTS[cell.entry](ctx)
        except Exception as exc:  # noqa: BLE001 (any failure is the observation)
            violation = _policy_error_in_chain(exc)
            if violation is not None:  # also when library code wrapped it in its own error
                return Result(cell, "violation", str(violation), violation)
            if isinstance(exc, AuditMismatch):
                return Result(cell, "wrong dtype", str(exc), exc)
            if isinstance(exc, (TypeError, ValueError)):
                return Result(cell, "rejected", f"{type(exc).__name__}: {exc}", exc)
            return Result(cell, "crash", f"{type(exc).__name__}: {exc}", exc)
    return Result(cell, "policy", "strict() raised nothing; every output had its dtype")


def _policy_error_in_chain(exc: BaseException | None) -> DtypePolicyError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DtypePolicyError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _one_thread():
    """One torch thread while a cell runs: the audit's matmuls are tiny, and on a shared,
    loaded machine the thread pool made them 10 to 20 times slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_matrix(directory=None, device="cpu", seed=0, progress=None) -> list[Result]:
    """Write the checkpoints (under `directory`, or a temporary one) and run every cell.

    `progress`: an optional wrapper for the iterable of cells (e.g. sage_core.notebook.progress).
    """
    float16 = float16_support(device)
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory())
        checkpoints = write_checkpoints(Path(directory) / "checkpoints", seed=seed)
        work = Path(directory) / "work"
        work.mkdir(parents=True, exist_ok=True)
        todo = cells()
        if progress is not None:
            todo = progress(todo)
        return [run_cell(c, checkpoints, work, device, seed, float16) for c in todo]


def summary(results: list[Result]) -> dict[str, int]:
    """Cells per outcome, every outcome listed (zeros included), in OUTCOMES order."""
    counts = Counter(r.outcome for r in results)
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}


def unexpected(results: list[Result], float16=None) -> list[str]:
    """One line per cell whose outcome differs from its declaration."""
    lines = []
    for r in results:
        expected = expectation(r.cell, float16)
        if not r.meets(expected):
            lines.append(f"{r.cell.id}: expected {expected.outcome}, got {r.outcome}: {r.detail}")
    return lines


# -- the figure -------------------------------------------------------------------------------

OUTCOME_COLOURS = {
    "policy": "#a8d5a2",
    "rejected": "#8fb8de",
    "skipped": "#d9d9d9",
    "violation": "#e06666",
    "wrong dtype": "#f3b35b",
    "crash": "#8b1a1a",
}


def plot_matrix(results: list[Result], float16=None):
    """Rows entry points, columns dtype combinations, colour = outcome; a cross marks a
    cell whose outcome is not the declared one."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rows = list(dict.fromkeys(r.cell.entry for r in results))
    columns = list(dict.fromkeys((r.cell.activation, r.cell.checkpoint) for r in results))
    fig, ax = plt.subplots(figsize=(0.55 * len(columns) + 3.2, 0.34 * len(rows) + 2.6))
    for r in results:
        x = columns.index((r.cell.activation, r.cell.checkpoint))
        y = rows.index(r.cell.entry)
        colour = OUTCOME_COLOURS[r.outcome]
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white", lw=1.5))
        if not r.meets(expectation(r.cell, float16)):
            ax.text(x + 0.5, y + 0.5, "x", ha="center", va="center", fontsize=9, weight="bold")
    ax.set_xlim(0, len(columns))
    ax.set_ylim(len(rows), 0)
    ax.set_yticks([i + 0.5 for i in range(len(rows))], rows, fontsize=8)
    ax.set_xticks([i + 0.5 for i in range(len(columns))], [c for _, c in columns], fontsize=7,
                  rotation=60, ha="right")  # fmt: skip
    activations = list(dict.fromkeys(a for a, _ in columns))
    for a in activations:
        first = next(i for i, (act, _) in enumerate(columns) if act == a)
        span = sum(1 for act, _ in columns if act == a)
        ax.text(first + span / 2, -0.3, a, ha="center", va="bottom", fontsize=8,
                weight="bold")  # fmt: skip
        if first:
            ax.axvline(first, color="black", lw=0.8)
    ax.set_xlabel("checkpoint weights")
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    counts = summary(results)
    handles = [Patch(color=OUTCOME_COLOURS[o], label=f"{o} ({counts[o]})") for o in OUTCOMES]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=6,
              fontsize=8, frameon=False)  # fmt: skip
    ax.set_title(f"dtype audit: {len(results)} cells under strict() (columns: activation dtype, "
                 "then checkpoint weights)", pad=22, fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


MODEL_ENTRIES = ("forward", "hidden_states", "generate", "perplexity", "experts on demand")


def check_checkpoint(path, activation="float32", device="cpu", seed=0) -> list[Result]:
    """The model entry points on one checkpoint (a real one: `model_path`) under strict()."""
    activation = str(activation).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as work:
        return [
            run_cell(Cell(entry, activation, "given"), {"given": path}, work, device, seed)
            for entry in MODEL_ENTRIES
        ]
