"""Command line: `python -m sage_core run [NOTEBOOK ...] [-p NAME VALUE ...] [--out DIR]` and
`python -m sage_core sweep NOTEBOOK ... [-p NAME VALUES ...] [--grid FILE] --out DIR`."""

import argparse
import sys

from sage_core.notebook import runner


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sage_core")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="execute notebooks in order with papermill",
        description="Execute notebooks in order (default: every notebooks/NN_*.ipynb). "
        "Without --out they are updated in place. Exit status: 0 all ran, 1 a cell failed, "
        "2 bad arguments.",
    )
    run.add_argument(
        "notebooks",
        nargs="*",
        metavar="NOTEBOOK",
        help="a notebook path or a bare name such as 01_rope_buffer_dtype",
    )
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="set a parameter; VALUE is a Python literal if it parses as one, else a string",
    )
    run.add_argument("--out", metavar="DIR", help="write executed copies and run.json here instead")
    _add_sweep_parser(commands)
    return parser


def _add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run notebooks over a parameter grid on a Dask cluster",
        description="Run every combination of NOTEBOOK x grid, each in its own folder under "
        "--out, on a local Dask cluster (or --scheduler / DASK_SCHEDULER_ADDRESS), then write "
        "OUT/sweep.csv and sweep.json. Finished runs are skipped. Exit status: 0 all ran, "
        "1 a run failed, 2 bad arguments.",
    )
    sweep.add_argument(
        "notebooks", nargs="+", metavar="NOTEBOOK", help="a notebook path or a bare name"
    )
    sweep.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUES"),
        help="values of a parameter: FIRST..LAST (integers, inclusive), a,b,c, or one value",
    )
    sweep.add_argument("--grid", metavar="FILE", help="JSON or YAML mapping name -> values")
    sweep.add_argument("--out", metavar="DIR", required=True, help="folder of the run folders")
    sweep.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler")
    sweep.add_argument("--workers", type=int, metavar="N", help="local workers (default: cores)")
    sweep.add_argument("--force", action="store_true", help="rerun finished runs too")


def _sweep(args) -> int:
    from sage_core.notebook import sweep

    try:
        grid = sweep.grid_from_arguments(args.parameter, args.grid)
        result = sweep.sweep(
            args.notebooks,
            grid,
            args.out,
            scheduler=args.scheduler,
            workers=args.workers,
            force=args.force,
        )
    except runner.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"table: {result.table_paths['csv']} ({len(result.records)} runs)", file=sys.stderr)
    return 1 if result.failed else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        return _sweep(args)
    parameters = {name: runner.parse_value(value) for name, value in args.parameter}
    try:
        results = runner.run(args.notebooks, parameters, out=args.out)
    except runner.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in results:  # the summary, after the progress bar
        print(f"{result.name:<36} {result.status:<6} {result.duration_s:7.1f} s")
    failed = [r for r in results if r.status != "ok"]
    where = args.out or "in place"
    print(f"{len(results) - len(failed)} of {len(results)} notebooks ran ({where})")
    for result in failed:
        where = (
            f"code cell {result.code_cell} (In [{result.execution_count}])"
            if result.code_cell is not None
            else "kernel"
        )
        print(
            f"{result.name}: failed at {where}: {result.error}\n"
            f"  partial notebook kept: {result.output}",
            file=sys.stderr,
        )
    return 1 if failed else 0
