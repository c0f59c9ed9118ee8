"""The benchmark targets, per config: correctness checks first, then timed ratios and RSS."""

import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from benchmarks.compile_time import measure as measure_compile
from benchmarks.references import (
    TransformersThinker,
    experts_implementations,
    experts_through_loop,
    loop_logits,
    row_major_experts,
)
from benchmarks.roofline import (
    MachineRates,
    decode_floor,
    matmul_replay_s,
    measure_rates,
    model_bytes,
    prefill_floor,
    read_rate,
)
from benchmarks.rss import measure_rss
from benchmarks.timing import Ratio, interleaved, paired_rounds, time_call
from sage_core import generate, load_thinker
from sage_core.checkpoint import save_thinker_checkpoint
from sage_core.checkpoint.cache_policy import POLICIES, make_policy, simulate, simulate_belady
from sage_core.checkpoint.expert_trace import TraceRecorder, access_sequence
from sage_core.model import moe
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.paths import MODELS
from sage_core.trust import TrustSelector, TrustTable
from sage_core.trust.classifier import ContextClassifier
from tests.checkpoints import foreign_tensors

# float32 logits of sage_core and a reference must agree this closely (absolute, scaled
# by the logits' own size) or the benchmark stops: a fast wrong model is not a result.
LOGITS_TOL = 1e-4

SHARED_LAYOUT = "on sage_core's transposed expert stacks"
# The prefill row of sage_core against itself with its per-expert Python loop, the
# multi-token expert path where torch._grouped_mm is not used.
OWN_LOOP = "sage_core with its per-expert loop (torch._grouped_mm off)"

# "mid": the real routing fan-out (128 experts, top-8) at reduced width. mrope_section is
# the real [24, 20, 20] scaled to head_dim 64.
MID = ThinkerTextConfig(
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=0,
    moe_intermediate_size=192,
    num_experts=128,
    num_experts_per_tok=8,
    rope_theta=1_000_000.0,
    mrope_section=(12, 10, 10),
)
# Init scale of the random weights: activations of order one, so routing, norms and the
# logits comparison all mean something (0.02, transformers' init, gives near-zero logits).
RANDOM_INIT_STD = 0.05


@dataclass(frozen=True)
class Workload:
    prefill_tokens: int = 256
    decode_prompt: int = 16
    decode_new: int = 16
    # Timed rounds per row: as many as fit budget_s (judged by the reference's first
    # call, which is also the warm-up), within [min_rounds, max_rounds].
    budget_s: float = 20.0
    min_rounds: int = 3
    max_rounds: int = 7
    # Compile time of generate(compile=True), cold and warm, in two fresh processes.
    compile_time: bool = True
    # The compiled decode row: new tokens per generation (the probe: 64, after the
    # same decode_prompt tokens), whole generate() timed, prefill included.
    compiled_new: int = 64
    rss_prompt: int = 256
    rss_decode: int = 4
    resident_fraction: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class Row:
    config: str
    measure: str
    reference: str
    target: float
    higher_is_better: bool
    value: float
    low: float
    high: float
    detail: str
    unit: str = "x"  # "x": a ratio; " ms": an absolute time, where the target is one
    # For a speed ratio: the reference's time over the workload's floor on this machine
    # (benchmarks.roofline), the largest ratio any implementation could reach here.
    ceiling: float | None = None
    # The reference's time over the time of our own matrix products alone, replayed: the
    # largest ratio for any implementation that issues the same products (same shapes).
    gemm_ceiling: float | None = None

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def target_text(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.target:.2f}{self.unit}"


@dataclass
class ConfigResult:
    name: str
    source: str
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Expert cache policies on one generation: dicts of policy, hit rate, reads per token.
    cache_policies: list[dict] = field(default_factory=list)


class BenchmarkMismatch(RuntimeError):
    """sage_core and a reference disagree: the timings would compare different models."""


def random_checkpoint(config: ThinkerTextConfig, out_dir, seed: int = 0) -> Path:
    """Random weights of `config` written in the real layout: `thinker.` keys, per-expert
    tensors, two bf16 shards with an index, plus foreign (talker, audio, ...) tensors."""
    with torch.device("meta"):
        model = Qwen3OmniThinker(config)
    model.to_empty(device="cpu")
    model.init_weights(std=RANDOM_INIT_STD, generator=torch.Generator().manual_seed(seed))
    return save_thinker_checkpoint(
        model.state_dict(),
        config,
        out_dir,
        dtype=torch.bfloat16,
        extra_tensors=foreign_tensors(seed),
    )


def find_tiny_checkpoint(models_dir: Path = MODELS) -> Path | None:
    """The committed default model: the first models/*/ holding config.json and weights."""
    for config in sorted(Path(models_dir).glob("*/config.json")):
        directory = config.parent
        if (directory / "model.safetensors").is_file() or (
            directory / "model.safetensors.index.json"
        ).is_file():
            return directory
    return None


def _ratio_row(
    config, measure, reference, target, ratio: Ratio, tokens: int, floor_s, gemm_s
) -> Row:
    ours, ref = ratio.ours.median, ratio.reference.median
    detail = (
        f"sage_core {tokens / ours:,.0f} tok/s ({ours * 1e3:.0f} ms), "
        f"reference {tokens / ref:,.0f} tok/s ({ref * 1e3:.0f} ms), "
        f"floor {floor_s * 1e3:.1f} ms (sage_core at {floor_s / ours:.0%} of the best possible), "
        f"our matrix products alone {gemm_s * 1e3:.1f} ms ({gemm_s / ours:.0%} of our time)"
    )
    return Row(
        config,
        measure,
        reference,
        target,
        True,
        ratio.value,
        ratio.low,
        ratio.high,
        detail,
        ceiling=ref / floor_s,
        gemm_ceiling=ref / gemm_s,
    )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(torch.float32) - b.to(torch.float32)).abs().max().item()


def _check_logits(result: ConfigResult, what: str, ours: torch.Tensor, theirs: torch.Tensor):
    diff = _max_abs_diff(ours, theirs)
    scale = max(1.0, ours.abs().max().item())
    result.checks.append(
        f"logits max |diff| sage_core vs {what}: {diff:.2e} (max |logit| {ours.abs().max():.2f})"
    )
    if not diff <= LOGITS_TOL * scale:
        raise BenchmarkMismatch(
            f"{result.name}: logits of sage_core and {what} differ by {diff:.3e} "
            f"(> {LOGITS_TOL * scale:.1e}); refusing to benchmark different models"
        )


@torch.no_grad()
def run_config(
    name: str, checkpoint: Path, work: Workload, log=print, rates: MachineRates | None = None
) -> ConfigResult:
    """Every target for one checkpoint, measured in this process (RSS in subprocesses).

    `rates`: this machine's measured FLOP and read rates for the floors (measured here
    when not given)."""
    result = ConfigResult(name, str(checkpoint))
    rates = rates if rates is not None else measure_rates()
    model = load_thinker(checkpoint)
    # The floors read weights at the rate measured over this model's own size.
    weights = model_bytes(model)
    rates = replace(rates, bytes_per_s=read_rate(weights), read_set_bytes=weights)
    cfg = model.config
    gen = torch.Generator().manual_seed(work.seed)
    prefill_len = min(work.prefill_tokens, cfg.max_position_embeddings)
    prefill_ids = torch.randint(0, cfg.vocab_size, (1, prefill_len), generator=gen)
    prompt_ids = torch.randint(0, cfg.vocab_size, (1, work.decode_prompt), generator=gen)

    def prefill():
        return model(prefill_ids)

    def decode():
        return generate(model, prompt_ids, work.decode_new)

    # Checks. Each contender's first call is also its warm-up, and its time sets how
    # many timed rounds fit the budget.
    log(f"[{name}] checks: logits vs transformers and the loop reference")
    ours_logits = prefill()
    references, first_call = {}, {}
    # transformers gets its own (row-major) expert layout; one more eager reference runs
    # on our transposed stacks, so the table shows what the layout alone is worth.
    row_major = row_major_experts(model)
    contenders = [(impl, impl, row_major) for impl in experts_implementations()]
    contenders.append((f"eager, {SHARED_LAYOUT}", "eager", None))
    for label, impl, experts in contenders:
        try:
            ref = TransformersThinker(model, impl, experts=experts)
            first_call[("prefill", label)] = time_call(lambda ref=ref: ref.logits(prefill_ids))
            ref_logits = ref.logits(prefill_ids)
        except Exception as e:  # e.g. CUDA-only kernels on this CPU machine
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            result.notes.append(f"transformers experts={label!r} not usable here: {reason[:160]}")
            continue
        _check_logits(result, f"transformers (experts={label})", ours_logits, ref_logits)
        references[label] = ref
    if "eager" not in references:
        raise RuntimeError(f"{name}: transformers' eager experts path did not run")
    # The original design held each expert as row-major nn.Linear weights; the second
    # loop runs on our transposed stacks (it gains from them too: matrix-vector products).
    loops = {
        "per-token per-expert loop": lambda: loop_logits(model, prefill_ids, row_major),
        f"per-token per-expert loop, {SHARED_LAYOUT}": lambda: loop_logits(model, prefill_ids),
    }
    for label, loop in loops.items():
        first_call[("prefill", label)] = time_call(loop)
        _check_logits(result, label, ours_logits, loop())
    if _prefill_takes_grouped_mm(model, prefill_ids):

        def own_loop():
            with experts_through_loop():
                return prefill()

        first_call[("prefill", OWN_LOOP)] = time_call(own_loop)
        _check_logits(result, OWN_LOOP, ours_logits, own_loop())
    else:
        own_loop = None
        result.notes.append(
            "sage_core's prefill runs its per-expert loop here (torch._grouped_mm missing or "
            "not usable for these experts): no row against the loop"
        )

    ours_tokens = decode()
    for impl, ref in references.items():
        started = time.perf_counter()
        tokens = ref.generate(prompt_ids, work.decode_new)
        first_call[("decode", impl)] = time.perf_counter() - started
        same = torch.equal(tokens, ours_tokens)
        result.checks.append(
            f"greedy tokens sage_core vs transformers generate (experts={impl}): "
            f"{'identical' if same else 'DIFFERENT'}"
        )
        if not same:
            raise BenchmarkMismatch(
                f"{name}: greedy decode of sage_core and transformers (experts={impl}) "
                f"differ: {ours_tokens.tolist()} vs {tokens.tolist()}; refusing to time "
                "different generations"
            )

    floors = {
        "prefill": prefill_floor(model, prefill_ids, rates),
        "decode": decode_floor(model, prompt_ids, work.decode_new, rates),
    }
    result.checks.append(
        f"floors ({rates.describe()}): prefill {floors['prefill'] * 1e3:.1f} ms, "
        f"decode {floors['decode'] * 1e3:.1f} ms"
    )
    gemms = {"prefill": matmul_replay_s(prefill), "decode": matmul_replay_s(decode)}
    result.checks.append(
        f"our matrix products alone, replayed: prefill {gemms['prefill'] * 1e3:.1f} ms, "
        f"decode {gemms['decode'] * 1e3:.1f} ms"
    )

    tokens = {"prefill": prefill_len, "decode": work.decode_new}

    def timed_row(kind, key, reference_label, target, reference):
        """Interleaved rounds of ours and `reference` for `kind`, as one table row."""
        ratio = paired_rounds(
            prefill if kind == "prefill" else decode,
            reference,
            first_call[(kind, key)],
            work.budget_s,
            work.min_rounds,
            work.max_rounds,
        )
        measure = f"{kind} tok/s"
        row = _ratio_row(
            name, measure, reference_label, target, ratio, tokens[kind], floors[kind], gemms[kind]
        )
        result.rows.append(row)

    for impl, ref in references.items():
        log(f"[{name}] prefill ({prefill_len} tokens) vs transformers experts={impl}")
        # grouped_mm: the issue's target (ahead of transformers' fastest CPU path by 10%).
        target = 1.2 if impl.startswith("eager") else 1.1 if impl == "grouped_mm" else 1.0
        reference = partial(ref.logits, prefill_ids)
        timed_row("prefill", impl, f"transformers experts={impl}", target, reference)
    if own_loop is not None:
        log(f"[{name}] prefill ({prefill_len} tokens) vs {OWN_LOOP}")
        timed_row("prefill", OWN_LOOP, OWN_LOOP, 1.0, own_loop)
    for label, loop in loops.items():
        log(f"[{name}] prefill ({prefill_len} tokens) vs the {label}")
        timed_row("prefill", label, label, 10.0, loop)
    for impl, ref in references.items():
        log(f"[{name}] decode ({work.decode_new} new tokens) vs transformers generate {impl}")
        reference = partial(ref.generate, prompt_ids, work.decode_new)
        timed_row("decode", impl, f"transformers generate experts={impl}", 1.5, reference)

    log(f"[{name}] compiled decode: compile time (fresh processes), then timed rounds")
    result.rows.extend(_compiled_rows(name, checkpoint, model, prompt_ids, work, result, rates))
    result.cache_policies = _cache_policy_rows(name, checkpoint, model, prompt_ids, work, log)
    result.rows.extend(_trust_rows(name, model, prefill, work, log))
    result.rows.extend(_rss_rows(result, cfg, checkpoint, work, log))
    return result


def _prefill_takes_grouped_mm(model, input_ids) -> bool:
    """Whether the model's prefill of `input_ids` runs torch._grouped_mm in every sparse
    layer (`moe.grouped_mm_usable`; the inputs' dtype and device are the embeddings')."""
    x = model.model.embed_tokens.weight[:1]  # (1, H): the hidden states' dtype and device
    blocks = [layer.mlp for layer in model.model.layers.values() if layer.is_sparse]
    return input_ids.numel() > 1 and all(moe.grouped_mm_usable(x, b.experts) for b in blocks)


def _compiled_rows(name, checkpoint, model, prompt_ids, work, result, rates):
    """generate(compile=True): compile time cold and warm (fresh processes, own inductor
    cache), then interleaved rounds against eager generate, both making `compiled_new`
    tokens; transformers' static-cache generate is checked and timed once where it runs."""
    new = work.compiled_new

    def compiled():
        return generate(model, prompt_ids, new, compile=True)

    def eager():
        return generate(model, prompt_ids, new)

    if work.compile_time:
        with tempfile.TemporaryDirectory(prefix="sage-inductor-") as cache_dir:
            cold = measure_compile(checkpoint, cache_dir, work.decode_prompt, new)
            warm = measure_compile(checkpoint, cache_dir, work.decode_prompt, new)
        result.checks.append(
            f"compile time of the decode step (first generate(compile=True) less an eager "
            f"one, fresh process): cold {cold['compile_s']:.1f} s (empty inductor cache), "
            f"warm {warm['compile_s']:.1f} s (same cache, second process)"
        )
    compiled()  # compiles in this process too (its time is the cold/warm one above)
    want = eager()
    same = torch.equal(compiled(), want)
    result.checks.append(
        f"greedy tokens generate(compile=True) vs eager generate: "
        f"{'identical' if same else 'DIFFERENT'}"
    )
    if not same:
        raise BenchmarkMismatch(f"{name}: compiled and eager greedy decode differ")
    ratio = paired_rounds(compiled, eager, time_call(eager), work.budget_s, 5, 9)
    ours = ratio.ours.median
    # The products are those of the eager path on the same generation (the compiled step
    # issues them inside one graph, where they cannot be recorded); the same FLOPs.
    gemm_s = matmul_replay_s(eager)
    row = _ratio_row(
        name,
        "compiled decode tok/s",
        f"sage_core eager generate (compile=False), {new} new tokens",
        3.0,
        ratio,
        new,
        decode_floor(model, prompt_ids, new, rates),
        gemm_s,
    )
    row = replace(
        row,
        detail=row.detail.replace("sage_core ", "compiled ", 1)
        + f"; same-products estimate {gemm_s * 1e3:.1f} ms, compiled decode at "
        f"{gemm_s / ours:.0%} of its speed",
    )
    rows = [row]
    try:
        ref = TransformersThinker(model, "grouped_mm", experts=row_major_experts(model))
        static = partial(ref.generate, prompt_ids, new, cache_implementation="static")
        times = [time_call(static) for _ in range(2)]
        same = torch.equal(static(), want)
        result.checks.append(
            "greedy tokens sage_core vs transformers generate (static cache, grouped_mm): "
            + ("identical" if same else "DIFFERENT")
        )
        result.notes.append(
            "transformers generate(cache_implementation='static', experts=grouped_mm): "
            f"{times[0]:.2f} s, then {times[1]:.2f} s per {new}-token generation, vs "
            f"compiled sage_core {ours:.3f} s ({times[1] / ours:.0f}x); timed twice, not in "
            "rounds (its calls are too slow on this CPU to interleave within the budget)"
        )
    except Exception as e:  # its static cache or compile may not run on this CPU
        result.notes.append(f"transformers static-cache generate not usable here: {e!r:.160}")
    return rows


def _cache_policy_rows(name, checkpoint, model, prompt_ids, work: Workload, log) -> list[dict]:
    """Every cache policy on one greedy generation, at `resident_fraction` of the experts:
    hit rate and bytes read per generated token measured by the real cache, next to
    Belady's MIN simulated on the same requests (the fewest reads any demand policy can
    make). The simulator must predict each real cache's hits exactly, or the row is void."""
    total = len(model.sparse_blocks()) * model.config.num_experts
    bound = max(1, round(work.resident_fraction * total))
    log(f"[{name}] expert cache policies at {bound} of {total} experts vs Belady")
    recorder = TraceRecorder(model)
    model.set_selector(recorder)
    try:
        want = generate(model, prompt_ids, work.decode_new)
    finally:
        model.set_selector(None)
    keys, _ = access_sequence(recorder.trace(), grouped=True)
    layers = sorted(model.sparse_blocks())
    rows, per_read = [], None
    for policy in POLICIES:
        cached = load_thinker(checkpoint, max_resident_experts=bound, cache_policy=policy)
        if not torch.equal(generate(cached, prompt_ids, work.decode_new), want):
            raise BenchmarkMismatch(f"{name}: cache policy {policy} changed the generation")
        stats = cached.expert_cache.stats()
        sim = simulate(keys, make_policy(policy, bound, layers=layers))
        if (stats["hits"], stats["misses"]) != (int(sim.hits.sum()), sim.misses):
            raise BenchmarkMismatch(f"{name}: the simulator mispredicts the {policy} cache")
        per_read = stats["bytes_read"] / max(1, stats["misses"])
        rows.append(
            {
                "policy": policy,
                "capacity": bound,
                "total": total,
                "hit_rate": sim.hit_rate,
                "bytes_per_token": stats["bytes_read"] / work.decode_new,
            }
        )
    belady = simulate_belady(keys, bound)
    rows.append(
        {
            "policy": "belady (offline bound, simulated)",
            "capacity": bound,
            "total": total,
            "hit_rate": belady.hit_rate,
            "bytes_per_token": belady.misses * per_read / work.decode_new,
        }
    )
    for row in rows:
        row["of_belady"] = row["hit_rate"] / belady.hit_rate if belady.hit_rate else float("nan")
    return rows


def _trust_rows(name, model, prefill, work: Workload, log) -> list[Row]:
    """The trust selector's cost on a forward pass, and the classifier's per generation.

    The trust table is neutral, so both arms route every token to the same experts and
    the difference is the selection itself; learned trust also changes which experts run,
    which is a different question (notebooks 05 and 07).
    """
    contexts = ["code", "reasoning", "text"]
    selector = TrustSelector.for_model(model, TrustTable.for_model(model, contexts))
    selector.context = contexts[0]

    def trusted():
        model.set_selector(selector)
        try:
            return prefill()
        finally:
            model.set_selector(None)

    reference = prefill()
    if not torch.equal(trusted(), reference):
        raise BenchmarkMismatch(f"{name}: neutral trust changed the logits")
    log(f"[{name}] trust-augmented forward vs router-only forward")
    ratio = paired_rounds(
        trusted, prefill, time_call(prefill), work.budget_s, work.min_rounds, work.max_rounds
    )
    overhead = Row(
        name,
        "forward time, trust / router",
        "router-only forward (neutral trust: same experts)",
        1.10,
        False,
        1 / ratio.value,
        1 / ratio.high,
        1 / ratio.low,
        f"trust {ratio.ours.median * 1e3:.1f} ms, router {ratio.reference.median * 1e3:.1f} ms",
    )
    # One generation is one pooled hidden state; the classifier is fitted on 3 x 32 of them.
    gen = torch.Generator().manual_seed(work.seed)
    hidden = model.config.hidden_size
    features = torch.randn(96, hidden, generator=gen)
    classifier = ContextClassifier(3, contexts, mode="supervised", seed=work.seed)
    classifier.fit(features, torch.arange(96) % 3)
    one = features[:1]
    samples = interleaved({"predict": lambda: classifier.predict(one)}, 3, 50)["predict"]
    predict = Row(
        name,
        "classifier predict, ms per generation",
        "absolute time (the target is absolute)",
        1.0,
        False,
        samples.median * 1e3,
        min(samples.seconds) * 1e3,
        max(samples.seconds) * 1e3,
        f"median of 50 calls on one ({hidden},) feature vector",
        unit=" ms",
    )
    return [overhead, predict]


def _rss_floor_note(cfg, total, torch_base, full, bounded, smallest) -> str:
    """What the peak above `import torch` is made of, and the lowest ratio any bound
    reaches: the same workload with a single resident expert."""
    mib = 1 << 20
    above = {
        name: run["peak_rss"] - torch_base
        for name, run in (("all", full), ("bounded", bounded), ("smallest", smallest))
    }
    floor_ratio = above["smallest"] / above["all"]
    # The expert stacks are what a bound can drop: float32, gate_up (2I x H) + down (H x I).
    experts = total * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    growth = []
    for name, run in (("all", full), ("bounded", bounded), ("smallest", smallest)):
        start, end = run.get("rss_import_torch") or {}, run["rss_at_end"]
        if start and end:
            mapped = run.get("checkpoint_mapped_at_end")
            growth.append(
                f"{name} +{(end['RssAnon'] - start['RssAnon']) / mib:.1f} MiB anonymous, "
                f"+{(end['RssFile'] - start['RssFile']) / mib:.1f} MiB file-backed"
                + ("" if mapped is None else f" (of which checkpoint {mapped / mib:.1f} MiB)")
            )
    return (
        f"peak RSS above `import torch`: all experts {above['all'] / mib:.1f} MiB, "
        f"max_resident_experts={bounded['max_resident_experts']} "
        f"{above['bounded'] / mib:.1f} MiB, a single resident expert "
        f"{above['smallest'] / mib:.1f} MiB ({floor_ratio:.2f}x of all: no bound goes "
        f"lower on this workload). All {total} expert stacks are {experts / mib:.1f} MiB "
        "(float32), the most a bound can drop. From `import torch` to the end of each run: "
        + "; ".join(growth)
        + ". The file-backed part other than the checkpoint's pages is library code (torch's "
        "above all), paged in as the workload first uses each kernel; it, the activations "
        "and the non-expert weights are fixed costs that no expert bound touches"
    )


def _rss_rows(result, cfg, checkpoint, work: Workload, log) -> list[Row]:
    total = sum(cfg.num_experts for i in range(cfg.num_hidden_layers) if cfg.is_sparse(i))
    bound = max(1, round(work.resident_fraction * total))
    log(f"[{result.name}] peak RSS: all {total} experts vs max_resident_experts={bound}")
    runs = measure_rss(
        checkpoint,
        # "smallest": one resident expert, the least any bound can keep: the ratio no
        # bound can go below on this workload (what is left is not the experts).
        {"all": None, "bounded": bound, "smallest": 1},
        work.rss_prompt,
        work.rss_decode,
        work.seed,
    )
    full, bounded, smallest = runs["all"], runs["bounded"], runs["smallest"]
    stats = bounded["cache"]
    lookups = stats["hits"] + stats["misses"]
    hit_rate = stats["hits"] / lookups if lookups else float("nan")
    mib = 1 << 20
    result.checks.append(
        "greedy tokens with all experts vs the bounded cache: "
        + ("identical" if full["generated"] == bounded["generated"] else "DIFFERENT")
    )
    torch_base = statistics.median(
        [full["peak_rss_import_torch"], bounded["peak_rss_import_torch"]]
    )
    detail = (
        f"peak RSS {bounded['peak_rss'] / mib:.0f} MiB vs {full['peak_rss'] / mib:.0f} MiB; "
        f"`import torch` alone {torch_base / mib:.0f} MiB; "
        f"cache hit rate {hit_rate:.1%} ({stats['hits']} hits, {stats['misses']} misses, "
        f"{stats['evictions']} evictions, {stats['bytes_read'] / mib:.0f} MiB read, "
        f"peak resident {stats['peak_resident']}/{bound}); "
        f"workload: {work.rss_prompt}-token prefill + {work.rss_decode} decode steps"
    )
    ends = []
    for label, run in (("bounded", bounded), ("all", full)):
        parts = run["rss_at_end"]
        if parts:
            ends.append(
                f"{label} {parts['RssAnon'] / mib:.0f} MiB anonymous + "
                f"{parts['RssFile'] / mib:.0f} MiB file-backed"
            )
    if ends:
        detail += "; RSS at the end: " + ", ".join(ends)
    ratio = bounded["peak_rss"] / full["peak_rss"]
    # The whole process, and what the model adds to it: the interpreter and torch's own
    # ~220 MiB are the same in both runs and would dominate a small model's ratio.
    model_ratio = (bounded["peak_rss"] - torch_base) / (full["peak_rss"] - torch_base)
    reference = f"max_resident_experts={bound} ({work.resident_fraction:.0%}) vs all {total}"
    result.notes.append(_rss_floor_note(cfg, total, torch_base, full, bounded, smallest))
    return [
        Row(result.name, "peak RSS", reference, 0.40, False, ratio, ratio, ratio, detail),
        Row(
            result.name,
            "peak RSS above `import torch`",
            reference,
            0.40,
            False,
            model_ratio,
            model_ratio,
            model_ratio,
            "the same runs, each less the RSS peak after `import torch`; the lowest any "
            f"bound reaches here: {(smallest['peak_rss'] - torch_base) / (full['peak_rss'] - torch_base):.2f}x "
            "(one resident expert; see the notes)",
        ),
    ]
