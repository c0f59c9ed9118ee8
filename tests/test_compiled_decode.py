"""generate(compile=True): the static-cache decode step, its torch.compile, and the fallbacks.

Compiling costs tens of seconds cold (seconds from inductor's on-disk cache), so the fast
tests share one compiled step: the committed default model at batch 1, cache bucket 256.
The mid configuration (128 experts, top-8) compiles another graph: marked slow.
"""

import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from sage_core import generate, load_thinker
from sage_core.model import decode
from sage_core.paths import MODELS, ROOT

if str(ROOT) not in sys.path:  # benchmarks/ sits beside sage_core, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.references import TransformersThinker  # noqa: E402
from benchmarks.suite import MID, RANDOM_INIT_STD  # noqa: E402
from sage_core.model.thinker import Qwen3OmniThinker  # noqa: E402

TINY = MODELS / "q3omni-tiny"
NEW = 64  # the generation length
TOL = 1e-4  # float32 logits, absolute, scaled by the logits' size


def prompt(vocab, length, seed):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return load_thinker(TINY)


@pytest.fixture(scope="module")
def compiled_tiny(tiny):
    """The tiny model with its step compiled once (the first generate compiles)."""
    generate(tiny, prompt(tiny.config.vocab_size, 16, 0), 4, compile=True)
    return tiny


def step_logits(model, ids, new, compile):
    """Logits of every decode step of a greedy static generation, (new - 1, vocab)."""
    out = []

    def greedy(logits):
        out.append(logits.clone())
        return logits.argmax(-1)

    tokens = decode.generate_static(model, ids, new, greedy, compile=compile)
    return tokens, torch.cat(out[1:])  # out[0]: the prefill's logits (eager either way)


def check_parity(model, ids, new):
    """Greedy tokens: compiled == eager static == eager generate == transformers; step
    logits compiled vs eager static vs a full forward over the generated sequence."""
    eager = generate(model, ids, new)
    compiled, compiled_logits = step_logits(model, ids, new, compile=True)
    static, static_logits = step_logits(model, ids, new, compile=False)
    theirs = TransformersThinker(model, "eager").generate(ids, new)
    # generate(compile=True) greedy picks each token inside the compiled step; the
    # callback path above returns the logits to pick from.
    assert torch.equal(generate(model, ids, new, compile=True), eager)
    assert torch.equal(compiled, eager)
    assert torch.equal(static, eager)
    assert torch.equal(theirs, eager)
    full = model(eager)[0, ids.shape[1] : -1]  # logits that predicted tokens 2 .. new
    scale = max(1.0, full.abs().max().item())
    assert (compiled_logits - full).abs().max().item() <= TOL * scale
    assert (compiled_logits - static_logits).abs().max().item() <= TOL * scale


def test_tiny_compiled_tokens_and_logits_match_eager_and_transformers(compiled_tiny):
    check_parity(compiled_tiny, prompt(compiled_tiny.config.vocab_size, 16, 1), NEW)


def test_no_recompilation_within_or_across_generations(compiled_tiny):
    """Prompts of other lengths in the same cache bucket, and a fresh model of the same
    shapes, reuse the one graph: not one recompilation in 64 tokens."""
    vocab = compiled_tiny.config.vocab_size
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(compiled_tiny, prompt(vocab, 16, 2), NEW, compile=True)
        generate(compiled_tiny, prompt(vocab, 9, 3), NEW, compile=True)
        generate(load_thinker(TINY), prompt(vocab, 16, 4), NEW, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def test_sampling_compiled_equals_sampling_eager(compiled_tiny):
    ids = prompt(compiled_tiny.config.vocab_size, 16, 5)
    kw = dict(temperature=0.8, top_p=0.9, seed=7)
    assert torch.equal(
        generate(compiled_tiny, ids, 24, compile=True, **kw), generate(compiled_tiny, ids, 24, **kw)
    )


def test_bounded_expert_cache_decodes_eagerly_with_a_warning_and_the_same_tokens(tiny):
    ids = prompt(tiny.config.vocab_size, 16, 6)
    bounded = load_thinker(TINY, max_resident_experts=32)
    with pytest.warns(RuntimeWarning, match="loaded on demand"):
        got = generate(bounded, ids, 16, compile=True)
    assert torch.equal(got, generate(tiny, ids, 16))


def test_an_untraceable_selector_decodes_eagerly_with_a_warning(tiny):
    from sage_core.trust import TrustSelector, TrustTable

    ids = prompt(tiny.config.vocab_size, 16, 7)
    selector = TrustSelector.for_model(tiny, TrustTable.for_model(tiny, ["code", "text"]))
    selector.context = "code"
    tiny.set_selector(selector)
    try:
        with pytest.warns(RuntimeWarning, match="TrustSelector does not declare"):
            got = generate(tiny, ids, 16, compile=True)
        want = generate(tiny, ids, 16)
    finally:
        tiny.set_selector(None)
    assert torch.equal(got, want)


class Excluding:
    """A pure-tensor selector: the router's top-k with some experts excluded."""

    compile_traceable = True

    def __init__(self, excluded, top_k, bad=False):
        self.excluded, self.top_k, self.bad = excluded, top_k, bad

    def __call__(self, router_logits, layer_idx, hidden_states):
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs.masked_fill(self.excluded, -1.0), self.top_k)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.bad and router_logits.shape[0] == 1:  # decode steps only, not the prompt
            indices = indices + router_logits.shape[-1]  # every choice out of range
        return indices, weights.to(hidden_states.dtype)


def test_traceable_selector_runs_in_the_static_step_with_its_exclusions(tiny):
    """Eager static step (the compiled step traces the same code; compiling one more
    selector's graph is left to the slow test)."""
    E, k = tiny.config.num_experts, tiny.config.num_experts_per_tok
    excluded = torch.zeros(E, dtype=torch.bool)
    excluded[::3] = True
    tiny.set_selector(Excluding(excluded, k))
    try:
        assert decode.eager_reason(tiny) is None
        ids = prompt(tiny.config.vocab_size, 16, 8)
        static = decode.generate_static(tiny, ids, 16, lambda x: x.argmax(-1), compile=False)
        assert torch.equal(static, generate(tiny, ids, 16))
        tiny.set_selector(Excluding(excluded, k, bad=True))
        with pytest.raises(ValueError, match=r"outside \[0, num_experts\)"):
            decode.generate_static(tiny, ids, 4, lambda x: x.argmax(-1), compile=False)
        with pytest.raises(ValueError, match=r"outside \[0, num_experts\)"):  # greedy step
            decode.generate_static(tiny, ids, 4, None, compile=False)
        with pytest.raises(ValueError, match=r"chose expert \d+, outside the valid range"):
            generate(tiny, ids, 4)  # the eager path keeps its immediate, precise error
    finally:
        tiny.set_selector(None)


def test_a_routing_trace_decodes_eagerly_with_a_warning(tiny):
    with tiny.routing_trace() as trace, pytest.warns(RuntimeWarning, match="routing_trace"):
        generate(tiny, prompt(tiny.config.vocab_size, 8, 9), 3, compile=True)
    assert all(len(v) == 3 for v in trace.values())


def test_without_a_cxx_compiler_compile_fails_at_once_and_eager_is_untouched(tiny, monkeypatch):
    monkeypatch.setattr(decode, "_which", lambda name: None)
    monkeypatch.setattr(decode, "generate_static", None)  # must not be reached
    ids = prompt(tiny.config.vocab_size, 8, 10)
    with pytest.raises(decode.CompileUnavailable, match="needs a C\\+\\+ compiler.*g\\+\\+"):
        generate(tiny, ids, 4, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(tiny, ids, 4).shape == (1, 12)


def test_cuda_path_options_and_missing_triton(monkeypatch):
    """What of the CUDA path runs on a CPU machine: its compile options and its check."""
    assert decode.compile_options(torch.device("cuda"))["mode"] == "reduce-overhead"
    assert "mode" not in decode.compile_options(torch.device("cpu"))
    monkeypatch.setattr(decode.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(decode.CompileUnavailable, match="needs triton"):
        decode.check_compiler(torch.device("cuda"))
    with pytest.raises(decode.CompileUnavailable, match="not 'mps'"):
        decode.check_compiler(torch.device("mps"))


def test_cache_length_is_bucketed_within_the_context():
    assert decode.static_cache_len(80, 1024) == 256
    assert decode.static_cache_len(257, 1024) == 512
    assert decode.static_cache_len(900, 1024) == 1024
    assert decode.static_cache_len(2000, 1024) == 2000


def test_compile_argument_is_checked(tiny):
    with pytest.raises(ValueError, match="compile must be True or False"):
        generate(tiny, prompt(tiny.config.vocab_size, 4, 0), 2, compile="yes")


@pytest.mark.slow
def test_mid_compiled_tokens_and_logits_match_eager_and_transformers():
    model = Qwen3OmniThinker(MID)
    model.init_weights(std=RANDOM_INIT_STD, generator=torch.Generator().manual_seed(0))
    check_parity(model.eval(), prompt(MID.vocab_size, 16, 11), NEW)


@pytest.mark.slow
def test_traceable_selector_compiled_equals_eager(tiny):
    E, k = tiny.config.num_experts, tiny.config.num_experts_per_tok
    excluded = torch.zeros(E, dtype=torch.bool)
    excluded[1::4] = True
    tiny.set_selector(Excluding(excluded, k))
    try:
        ids = prompt(tiny.config.vocab_size, 16, 12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = generate(tiny, ids, NEW, compile=True)
        assert torch.equal(got, generate(tiny, ids, NEW))
    finally:
        tiny.set_selector(None)
