"""Smoke test of the benchmark code paths (`make bench`) at toy size.

Runs every target once on a toy random checkpoint, RSS subprocesses included, and checks
the rows and the table. It asserts structure and correctness checks, never speed.
"""

import math
import sys

import pytest
import torch
import transformers.models.qwen3_omni_moe  # noqa: E402,F401  (the oracle: a missing one fails, never skips)

from sage_core.paths import ROOT

# benchmarks/ is a top-level package beside sage_core, not installed: `python -m pytest`
# from the root finds it, the bare `pytest` script does not.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.references import (  # noqa: E402
    TransformersThinker,
    loop_logits,
    row_major_experts,
)
from benchmarks.report import COLUMNS, markdown_table, results_markdown, write_atomic  # noqa: E402
from benchmarks.roofline import (  # noqa: E402
    MachineRates,
    _RecordMatmuls,
    forward_work,
    matmul_replay_s,
)
from benchmarks.suite import (  # noqa: E402
    OWN_LOOP,
    BenchmarkMismatch,
    Workload,
    find_tiny_checkpoint,
    random_checkpoint,
    run_config,
)
from benchmarks.timing import Samples, interleaved, speedup  # noqa: E402
from sage_core import load_thinker  # noqa: E402
from sage_core.checkpoint.cache_policy import POLICIES  # noqa: E402
from sage_core.model.config import ThinkerTextConfig  # noqa: E402

TOY = ThinkerTextConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=0,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    rope_theta=10_000.0,
    mrope_section=(2, 1, 1),
)
TOY_WORK = Workload(
    prefill_tokens=12,
    decode_prompt=4,
    decode_new=3,
    compiled_new=3,
    budget_s=0.0,
    min_rounds=1,
    max_rounds=1,
    rss_prompt=8,
    rss_decode=2,
    compile_time=False,  # two fresh processes compiling: covered by `make bench` itself
)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    return random_checkpoint(TOY, tmp_path_factory.mktemp("toy"), seed=0)


def test_run_config_rows_checks_and_table(toy_checkpoint, tmp_path):
    result = run_config("toy", toy_checkpoint, TOY_WORK, log=lambda *a: None)
    measures = [(row.measure, row.reference) for row in result.rows]
    assert ("prefill tok/s", "transformers experts=eager") in measures
    assert ("prefill tok/s", "per-token per-expert loop") in measures
    assert ("decode tok/s", "transformers generate experts=eager") in measures
    compiled = ("compiled decode tok/s", "sage_core eager generate (compile=False), 3 new tokens")
    assert compiled in measures
    assert [m[0] for m in measures[-4:]] == [
        "forward time, trust / router",
        "classifier predict, ms per generation",
        "peak RSS",
        "peak RSS above `import torch`",
    ]
    # max_resident_experts is 25% of the 16 experts: 4.
    assert "max_resident_experts=4 (25%) vs all 16" in measures[-1][1]
    targets = {(row.measure, row.reference): row.target_text for row in result.rows}
    assert targets[("prefill tok/s", "transformers experts=eager")] == ">= 1.20x"
    assert targets[("prefill tok/s", "per-token per-expert loop")] == ">= 10.00x"
    assert targets[measures[-1]] == "<= 0.40x"
    if ("prefill tok/s", "transformers experts=grouped_mm") in targets:
        assert targets[("prefill tok/s", "transformers experts=grouped_mm")] == ">= 1.10x"
    # sage_core's prefill (torch._grouped_mm where usable) against its own per-expert loop:
    # same logits (checked before timing, a mismatch stops the run) and a timed row.
    if hasattr(torch, "_grouped_mm"):
        assert ("prefill tok/s", OWN_LOOP) in measures
        assert targets[("prefill tok/s", OWN_LOOP)] == ">= 1.00x"
        assert any(
            check.startswith(f"logits max |diff| sage_core vs {OWN_LOOP}")
            for check in result.checks
        )
    # The RSS floor: the same workload with one resident expert, and what the peak holds.
    floor = [note for note in result.notes if note.startswith("peak RSS above `import torch`")]
    assert len(floor) == 1 and "a single resident expert" in floor[0]
    for row in result.rows:
        assert math.isfinite(row.value) and row.value > 0
        assert row.low <= row.value <= row.high
        assert row.passed == (
            row.value >= row.target if row.higher_is_better else row.value <= row.target
        )
        if row.ceiling is not None:  # nothing beats the floor: ours is never faster than it
            assert row.ceiling >= row.value, (row, row.ceiling)
            # our products alone take less than our whole forward; the two are timed at
            # different moments, so a loaded machine gets a margin for timing noise
            assert row.gemm_ceiling >= 0.75 * row.value, (row, row.gemm_ceiling)
    assert "hit rate" in result.rows[-2].detail and "import torch" in result.rows[-2].detail
    assert sum(row.ceiling is not None for row in result.rows) == len(result.rows) - 4
    # The correctness checks ran and agreed (toy weights, float32).
    assert sum("per-token per-expert loop" in c for c in result.checks) == 2
    assert all("DIFFERENT" not in c for c in result.checks), result.checks

    table = markdown_table(result.rows).splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table) == 2 + len(result.rows)
    assert all(line.count("|") == len(COLUMNS) + 1 for line in table)
    out = tmp_path / "RESULTS.md"
    write_atomic(out, results_markdown([result], ["header line"], ["tiny: skipped"]))
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nheader line\n") and "- tiny: skipped" in text
    policies = {r["policy"]: r for r in result.cache_policies}
    assert set(policies) == {*POLICIES, "belady (offline bound, simulated)"}
    assert all(0 <= r["hit_rate"] <= 1 and r["of_belady"] <= 1 for r in policies.values())
    assert "| toy | lru | 4/16 |" in text
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_references_run_on_the_same_weights(toy_checkpoint):
    model = load_thinker(toy_checkpoint)
    ids = torch.randint(0, TOY.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    ref = TransformersThinker(model, "eager")
    assert ref.thinker.lm_head.weight is model.lm_head.weight
    with torch.no_grad():
        ours = model(ids)
    assert ours.abs().max() > 0.1  # the comparison below means something
    torch.testing.assert_close(ref.logits(ids), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(loop_logits(model, ids), ours, atol=1e-5, rtol=0)
    # The references' own (row-major) expert layout: same values, another memory order.
    row_major = row_major_experts(model)
    assert row_major and all(t.is_contiguous() for t in row_major.values())
    own = TransformersThinker(model, "eager", experts=row_major)
    assert own.thinker.lm_head.weight is model.lm_head.weight
    torch.testing.assert_close(own.logits(ids), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(loop_logits(model, ids, row_major), ours, atol=1e-5, rtol=0)
    assert ref.generate(ids, 3).shape == (1, 13)


def test_mismatched_reference_stops_the_benchmark(toy_checkpoint, monkeypatch):
    import benchmarks.suite as suite

    real = suite.loop_logits
    monkeypatch.setattr(
        suite, "loop_logits", lambda model, ids, experts=None: real(model, ids, experts) + 1.0
    )
    with pytest.raises(BenchmarkMismatch, match="per-token per-expert loop"):
        run_config("toy", toy_checkpoint, TOY_WORK, log=lambda *a: None)


def test_a_greedy_token_mismatch_stops_the_benchmark(toy_checkpoint, monkeypatch):
    real = TransformersThinker.generate

    def off_by_one(self, ids, n):
        tokens = real(self, ids, n)
        tokens[0, -1] = (tokens[0, -1] + 1) % TOY.vocab_size
        return tokens

    monkeypatch.setattr(TransformersThinker, "generate", off_by_one)
    with pytest.raises(BenchmarkMismatch, match="greedy decode"):
        run_config("toy", toy_checkpoint, TOY_WORK, log=lambda *a: None)


def test_interleaved_rounds_alternate_who_goes_first():
    calls = []
    interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 0, 4)
    assert "".join(calls) == "abbaabba"


def test_speedup_is_paired_reference_over_ours():
    ratio = speedup(Samples((1.0, 2.0, 1.0)), Samples((3.0, 2.0, 5.0)))
    assert (ratio.value, ratio.low, ratio.high) == (3.0, 1.0, 5.0)
    with pytest.raises(ValueError):
        speedup(Samples((1.0,)), Samples((1.0, 2.0)))


def test_find_tiny_checkpoint_needs_config_and_weights(tmp_path):
    assert find_tiny_checkpoint(tmp_path) is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    assert find_tiny_checkpoint(tmp_path) is None  # no weights yet: still being trained
    (tmp_path / "b" / "model.safetensors").write_bytes(b"")
    assert find_tiny_checkpoint(tmp_path) == tmp_path / "b"


def test_forward_work_counts_flops_and_weight_bytes_by_hand(toy_checkpoint):
    model = load_thinker(toy_checkpoint)
    routing = {i: torch.tensor([[0, 1], [1, 2], [0, 1]]) for i in (0, 1)}  # 3 experts, 6 slots
    work = forward_work(model, tokens=3, context=3, routing=routing, lm_head_rows=3)
    # Per layer: q,k,v,o 32*8*(4+4+2+2) = 3072 params; causal scores + values over
    # 0+1+2+3 = 6 (query, key) pairs: 2*2*4 heads*8*6 = 768; router 8*32; experts
    # 3*16*32 = 1536 params, run for 6 slots, read for 3 distinct experts.
    flops_layer = 2 * 3 * 3072 + 768 + 2 * 3 * 8 * 32 + 2 * 6 * 1536
    bytes_layer = 3072 * 4 + 2 * 2 * 8 * 3 * 4 + (8 * 32 + 3 * 1536) * 4
    assert work.flops == 2 * flops_layer + 2 * 3 * 64 * 32
    assert work.bytes == 2 * bytes_layer + 64 * 32 * 4
    rates = MachineRates(flops_per_s=1e9, bytes_per_s=1e6)
    assert work.floor_s(rates) == max(work.flops / 1e9, work.bytes / 1e6)


def test_matmul_replay_records_exactly_the_products_and_times_them():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    out = torch.empty(8, 4)

    def work():
        torch.mm(a, b, out=out)
        torch.nn.functional.linear(a, b.t())  # addmm/mm underneath
        torch.bmm(a[None], b[None])
        (a * 2).sum()  # not a product: not replayed

    with _RecordMatmuls() as recorder:
        work()
    names = [func.overloadpacket.__name__ for func, _, _ in recorder.calls]
    assert len(names) == 3 and set(names) <= _RecordMatmuls.OPS and "bmm" in names
    assert matmul_replay_s(work) > 0


def test_expert_threads_experiment_reports_both_ratios(capsys):
    from benchmarks.expert_threads import main

    main(rounds=1)
    lines = capsys.readouterr().out.splitlines()
    ratios = [float(line.split(" are ")[1].split("x")[0]) for line in lines if " are " in line]
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)
