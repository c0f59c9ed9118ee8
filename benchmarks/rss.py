"""Peak resident memory of one load-and-generate workload, measured in a fresh process.

`python -m benchmarks.rss CHECKPOINT --max-resident N` loads the checkpoint with
`load_thinker(max_resident_experts=N)` (or every expert, without the flag), runs a
greedy `generate` of `--decode` tokens after a `--prompt`-token prefill, and prints one
JSON line: the peak RSS of the whole process (nothing subtracted) after `import torch`,
after loading and at the end, plus the expert cache statistics. The peak is the kernel's
VmHWM (/proc/self/status), which starts afresh at exec; getrusage's ru_maxrss does not
(Linux carries the parent's peak across fork and exec), so a worker started from a big
benchmark process would report the parent's size.
`measure_rss` runs one such process per setting, so no setting inherits another's
allocator state.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (VmHWM; ru_maxrss off Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    # macOS reports ru_maxrss in bytes, the BSDs in KiB; this fallback is for macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_parts_bytes() -> dict:
    """Current anonymous and file-backed resident memory (Linux; empty elsewhere).

    File-backed pages are the memory-mapped safetensors shards the reader touched: they
    count in RSS (and in the peak) though the kernel may drop them under pressure."""
    parts = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    name, value = line.split()[:2]
                    parts[name.rstrip(":")] = int(value) * 1024
    except OSError:
        pass
    return parts


def mapped_rss_bytes(suffix: str) -> int | None:
    """Resident bytes of this process's file mappings whose path ends with `suffix`
    (/proc/self/smaps; None where it cannot be read)."""
    total, current = 0, None
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if fields and "-" in fields[0] and not fields[0].endswith(":"):
                    current = fields[5] if len(fields) > 5 else ""
                elif fields and fields[0] == "Rss:" and current and current.endswith(suffix):
                    total += int(fields[1]) * 1024  # kB
    except OSError:
        return None
    return total


def run_workload(checkpoint: str, max_resident: int | None, prompt: int, decode: int, seed: int):
    at_start = peak_rss_bytes()
    import torch

    torch.set_num_threads(2)
    after_import_torch = peak_rss_bytes()
    parts_import_torch = rss_parts_bytes()
    from sage_core import generate, load_thinker

    model = load_thinker(checkpoint, max_resident_experts=max_resident)
    after_load = peak_rss_bytes()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(seed))
    tokens = generate(model, ids, decode)
    cache = model.expert_cache
    return {
        "max_resident_experts": max_resident,
        "peak_rss_start": at_start,
        "peak_rss_import_torch": after_import_torch,
        "peak_rss_after_load": after_load,
        "peak_rss": peak_rss_bytes(),
        "rss_import_torch": parts_import_torch,
        "rss_at_end": rss_parts_bytes(),
        "checkpoint_mapped_at_end": mapped_rss_bytes(".safetensors"),
        "generated": tokens[0, prompt:].tolist(),
        "cache": None if cache is None else cache.stats(),
    }


def measure_rss(checkpoint, settings: dict, prompt: int, decode: int, seed: int) -> dict:
    """{name: workload result} for settings {name: max_resident_experts or None}."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    results = {}
    for name, bound in settings.items():
        cmd = [sys.executable, "-m", "benchmarks.rss", str(checkpoint)]
        cmd += ["--prompt", str(prompt), "--decode", str(decode), "--seed", str(seed)]
        if bound is not None:
            cmd += ["--max-resident", str(bound)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"RSS worker {name!r} failed (exit {done.returncode}): {' '.join(cmd)}\n"
                f"{done.stderr[-2000:]}"
            )
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--max-resident", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_workload(args.checkpoint, args.max_resident, args.prompt, args.decode, args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
