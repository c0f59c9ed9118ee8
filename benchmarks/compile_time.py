"""Compile time of the decode step, cold and warm, each in a fresh process.

`python -m benchmarks.compile_time CHECKPOINT CACHE_DIR PROMPT NEW` loads the checkpoint,
times one eager generate, then the first generate(compile=True) (which compiles), and
prints JSON: {"eager_s", "first_compiled_s", "compile_s"}, compile_s being the difference
(the compiled generation's own decode time is small next to it). Inductor's on-disk cache
lives in CACHE_DIR (TORCHINDUCTOR_CACHE_DIR): an empty one is a cold start, a second run
on the same one is what every later process on the machine pays.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(checkpoint, cache_dir, prompt: int, new: int, threads: int = 2) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    args = [sys.executable, "-m", "benchmarks.compile_time", str(checkpoint), str(cache_dir)]
    args += [str(prompt), str(new), str(threads)]
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    checkpoint, _, prompt, new, threads = argv
    import torch

    from sage_core import generate, load_thinker

    torch.set_num_threads(int(threads))
    model = load_thinker(checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (1, int(prompt)))
    generate(model, ids, int(new))  # warm the eager path first: same one-off costs
    start = time.perf_counter()
    generate(model, ids, int(new))
    eager = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, ids, int(new), compile=True)
    first = time.perf_counter() - start
    print(json.dumps({"eager_s": eager, "first_compiled_s": first, "compile_s": first - eager}))


if __name__ == "__main__":
    main(sys.argv[1:])
