"""Why sage_core does not split a layer's experts over CPU worker threads (a rejected design).

The experts of one layer are independent products, so instead of running them one after
another with every GEMM split over all torch threads (intra-op parallelism), each of N
worker threads could run whole experts with single-threaded GEMMs. On the mid config's
expert shapes that alone is much faster. In a model it is not: between the expert phases
the other ops run multi-threaded, and after each such op OpenMP's team threads keep
spinning for the next one, taking a core from the workers. This script measures both
cases as ratios of interleaved rounds in one process:

    python -m benchmarks.expert_threads
"""

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from benchmarks.suite import MID
from benchmarks.timing import interleaved, speedup
from sage_core.model.moe import _expert_ffn

ROWS_PER_EXPERT = 16  # a 256-token prefill at top-8 over 128 experts


def main(rounds: int = 11) -> None:
    gen = torch.Generator().manual_seed(0)
    E, H, inter = MID.num_experts, MID.hidden_size, MID.moe_intermediate_size
    layers = MID.num_hidden_layers

    def stacked(*shape):  # sage_core's CPU layout: each expert's matrix column-major
        return torch.randn(*shape, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)

    gate_up = [stacked(E, 2 * inter, H) for _ in range(layers)]
    down = [stacked(E, H, inter) for _ in range(layers)]
    xs = torch.randn(E * ROWS_PER_EXPERT, H, generator=gen)
    ys = torch.empty_like(xs)
    hidden, weight = torch.randn(256, H, generator=gen), torch.randn(H, H, generator=gen)
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))

    def experts(layer, chosen):
        with torch.no_grad():  # grad mode is per thread
            for e in chosen:
                rows = slice(e * ROWS_PER_EXPERT, (e + 1) * ROWS_PER_EXPERT)
                _expert_ffn(xs[rows], gate_up[layer][e], down[layer][e], out=ys[rows])

    def other_ops():  # multi-threaded non-expert work, as attention and norms are
        y = hidden
        for _ in range(6):
            y = F.rms_norm(F.linear(y, weight), (H,))

    def forward(split: bool, with_other_ops: bool):
        for layer in range(layers):
            if with_other_ops:
                other_ops()
            if split:
                parts = [range(i, E, threads) for i in range(threads)]
                for future in [pool.submit(experts, layer, part) for part in parts]:
                    future.result()
            else:
                experts(layer, range(E))

    print(f"{threads} torch threads; {layers} layers x {E} experts x {ROWS_PER_EXPERT} rows")
    for with_other_ops in (False, True):
        samples = interleaved(
            {
                "one by one": lambda: forward(False, with_other_ops),  # noqa: B023 (run here)
                "split": lambda: forward(True, with_other_ops),  # noqa: B023
            },
            warmup=1,
            repeats=rounds,
        )
        ratio = speedup(samples["split"], samples["one by one"])
        what = "with multi-threaded ops between layers" if with_other_ops else "products alone"
        print(
            f"{what}: experts over {threads} single-threaded workers are "
            f"{ratio.value:.2f}x as fast as one by one (rounds {ratio.low:.2f}-{ratio.high:.2f}; "
            f"{ratio.ours.median * 1e3:.1f} vs {ratio.reference.median * 1e3:.1f} ms)"
        )
    pool.shutdown()


if __name__ == "__main__":
    main()
