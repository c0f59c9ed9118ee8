"""`python -m benchmarks`: run every target on every config, print the table, write RESULTS.md."""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchmarks.report import markdown_table, results_markdown, write_atomic
from benchmarks.roofline import measure_rates
from benchmarks.suite import MID, Workload, find_tiny_checkpoint, random_checkpoint, run_config

THREADS = 2
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
COMMAND = "make bench  (= python -m benchmarks)"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--configs", default="mid,tiny", help="comma-separated: mid, tiny")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results file")
    parser.add_argument(
        "--budget", type=float, default=Workload.budget_s, help="seconds of timed rounds per row"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - {"mid", "tiny"}
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from mid, tiny")

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    work = Workload(budget_s=args.budget)
    load_before = _load()
    started = time.perf_counter()
    rates = measure_rates()
    print(rates.describe())
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="sage-bench-") as tmp:
        for name in names:
            if name == "mid":
                print("[mid] writing random weights in the real layout (bf16, 2 shards)")
                checkpoint = random_checkpoint(MID, Path(tmp) / "mid", seed=work.seed)
            else:
                checkpoint = find_tiny_checkpoint()
                if checkpoint is None:
                    note = "tiny: skipped, no models/*/config.json with weights yet"
                    print(note)
                    skipped.append(note)
                    continue
            results.append(run_config(name, checkpoint, work, rates=rates))
    elapsed = time.perf_counter() - started

    rows = [row for result in results for row in result.rows]
    header = [
        f"Command: `{COMMAND}`. Every figure is a ratio against a reference run measured in",
        "the same process on the same weights (peak RSS: fresh subprocesses, one per",
        "setting): the very tensors, except that transformers and the original loop hold",
        "row-major copies of the expert stacks (their own layout; ours are stored transposed),",
        "and one more row each runs them on ours. Timed rounds are interleaved; the ratio is",
        "the median of per-round ratios, the spread their range. Absolute times are in the",
        "sections below.",
        "transformers runs with its default SDPA attention (as sage_core uses SDPA); rounds",
        "alternate which contender runs first; a logits or greedy-token mismatch stops the run.",
        'The two ceiling columns are estimates, not limits. "ceiling estimate here" is the',
        "reference's time over a floor: max(FLOPs / peak GEMM rate, weight bytes / read rate)",
        "per forward, rates measured in this run, work counted from the experts each forward",
        "really used (benchmarks/roofline.py); the read rate is measured over as many bytes",
        "as the config's weights (its working set), since a small model is read from cache.",
        "\"ceiling estimate, same products\" is the reference's time over sage_core's matrix",
        "products alone, replayed back to back (attention's fused kernel not included): a",
        "guide to what an implementation issuing the same products might reach.",
        "sage_core's prefill issues each layer's expert products as two torch._grouped_mm",
        'calls; the row "sage_core with its per-expert loop" times it against the same',
        "model with its per-expert Python loop instead (the path kept where _grouped_mm is not",
        "usable: autograd, experts loaded on demand, other devices).",
        "",
        f"- {rates.describe()}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {THREADS} torch threads, "
        f"{os.cpu_count()} CPUs, float32",
        f"- load average (1/5/15 min): {load_before} before, {_load()} after; "
        f"total {elapsed:.0f} s",
        f"- workload: prefill {work.prefill_tokens} tokens; decode {work.decode_prompt}-token "
        f"prompt + {work.decode_new} new tokens (greedy, whole generate() timed), the compiled "
        f"decode rows {work.compiled_new} new tokens (the issue's probe), compiled and eager "
        f"in 5-9 interleaved rounds; per other row, the reference's first call (the checks) "
        f"is the warm-up, then {work.min_rounds}-{work.max_rounds} interleaved rounds (as fit "
        f"{work.budget_s:.0f} s)",
    ]
    text = results_markdown(results, header, skipped)
    print()
    print(markdown_table(rows))
    write_atomic(args.out, text)
    print(f"\nwrote {args.out} ({elapsed:.0f} s, load {_load()})")
    failed = [row for row in rows if not row.passed]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
