"""Why sage_core does not split a layer's experts over CPU worker threads (a rejected design).

The experts of one layer are independent products, so instead of running them one after
another with every GEMM split over all torch threads (intra-op parallelism), each of N
worker threads could run whole experts with single-threaded GEMMs. On the mid config's
expert shapes that alone is much faster. In a model it is not: between the expert phases
the other ops run multi-threaded, and after each such op OpenMP's team threads keep
spinning for the next one, taking a core from the workers. This script measures both
cases as ratios in one process:

    python -m benchmarks.expert_threads
"""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from benchmarks.suite import MID

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
                g, u = F.linear(xs[rows], gate_up[layer][e]).chunk(2, dim=-1)
                torch.mm(F.silu(g).mul_(u), down[layer][e].t(), out=ys[rows])

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

    def seconds(split, with_other_ops):
        forward(split, with_other_ops)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            forward(split, with_other_ops)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(f"{threads} torch threads; {layers} layers x {E} experts x {ROWS_PER_EXPERT} rows")
    for with_other_ops in (False, True):
        one_by_one = seconds(False, with_other_ops)
        split = seconds(True, with_other_ops)
        what = "with multi-threaded ops between layers" if with_other_ops else "products alone"
        print(
            f"{what}: experts over {threads} single-threaded workers are "
            f"{one_by_one / split:.2f}x as fast as one by one "
            f"({split * 1e3:.1f} vs {one_by_one * 1e3:.1f} ms)"
        )
    pool.shutdown()


if __name__ == "__main__":
    main()
