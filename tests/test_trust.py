"""Trust table, selector rules, update rule and persistence (sage_core.trust)."""

import pytest
import scipy.stats
import torch
from checkpoints import toy_config
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.model.config import ThinkerTextConfig
from sage_core.model.moe import RouterTopK
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.trust import (
    REPORT_PRIOR,
    AblationSelector,
    CounterfactualLearner,
    LearnedBiasLearner,
    LearnedBiasSelector,
    OracleSelector,
    TrustLearner,
    TrustSelector,
    TrustStateError,
    TrustTable,
    attribution_estimates,
    dense_routing,
)
from sage_core.trust.learners import AttributionLearner, _expert_outputs, removal_changes

CONTEXTS = ("code", "reasoning", "text")
CONFIG = toy_config(
    vocab_size=64,
    num_hidden_layers=3,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Qwen3OmniThinker(CONFIG).to(dtype).eval()


def random_trust(table, seed):
    gen = torch.Generator().manual_seed(seed)
    table.trust += torch.randn(table.trust.shape, generator=gen)
    return table


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 9),
    num_experts=st.integers(2, 16),
    data=st.data(),
    dtype=st.sampled_from(sorted(DTYPES)),
    norm_topk_prob=st.booleans(),
    prior=st.sampled_from([0.0, 0.5, -1.25]),
    beta=st.floats(0, 10),
    coarse=st.booleans(),
    rule=st.sampled_from(["exclude", "bias"]),
)
def test_neutral_trust_is_router_topk_on_every_layer(
    seed, tokens, num_experts, data, dtype, norm_topk_prob, prior, beta, coarse, rule
):
    top_k = data.draw(st.integers(1, num_experts))
    layers = [0, 2, 5]
    table = TrustTable(layers, CONTEXTS, num_experts, prior=prior)
    selector = TrustSelector(table, top_k, norm_topk_prob, rule=rule, beta=beta)
    router = RouterTopK(top_k, norm_topk_prob)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen) * 3
    if coarse:  # many exact ties, the hard case for "identical"
        logits = logits.round()
    logits = logits.to(DTYPES[dtype])
    hidden = torch.zeros(tokens, 4, dtype=DTYPES[dtype])
    for context in CONTEXTS:
        selector.context = context
        for layer in layers:
            got_i, got_w = selector(logits, layer, hidden)
            want_i, want_w = router(logits, layer, hidden)
            assert torch.equal(got_i, want_i)
            assert torch.equal(got_w, want_w)
            assert got_w.dtype == hidden.dtype


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("trust", ["neutral", "learned, beta=0"])
def test_model_with_trust_selector_matches_router_exactly(dtype, trust):
    model = tiny_model(DTYPES[dtype])
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with model.routing_trace() as router_trace:
        want = model(ids)
    table = TrustTable.for_model(model, CONTEXTS)
    beta = 1.0
    if trust != "neutral":
        random_trust(table, seed=3)
        beta = 0.0
    selector = TrustSelector.for_model(model, table, rule="bias", beta=beta)
    selector.context = "text"
    model.set_selector(selector)
    with model.routing_trace() as trust_trace:
        got = model(ids)
    assert torch.equal(got, want)
    for layer in table.layers:
        for (gi, gw), (wi, ww) in zip(trust_trace[layer], router_trace[layer], strict=True):
            assert torch.equal(gi, wi) and torch.equal(gw, ww)


def test_learned_trust_changes_the_choice_and_is_logged():
    model = tiny_model()
    table = random_trust(TrustTable.for_model(model, CONTEXTS), seed=4)
    table.trust *= 5
    selector = TrustSelector.for_model(model, table, rule="bias", beta=1.0)
    selector.context = "code"
    selector.recording = True
    model.set_selector(selector)
    model(torch.arange(12)[None])
    changed = selector.slots_changed_by_layer()
    assert sorted(changed) == table.layers
    assert any(fraction > 0 for fraction in changed.values())
    for choice in selector.log:  # weights are router probabilities of the chosen set
        assert torch.allclose(choice.weights.sum(-1), torch.ones(12))


def test_bias_rule_ranks_by_log_prob_plus_beta_trust():
    table = TrustTable([0], ["c"], 4)
    table.trust[0, 0] = torch.tensor([0.0, 0.0, 2.0, 0.0])
    selector = TrustSelector(table, top_k=2, norm_topk_prob=True, rule="bias", beta=1.0)
    selector.context = "c"
    logits = torch.tensor([[3.0, 2.5, 1.0, 0.0]])
    indices, weights = selector(logits, 0, torch.zeros(1, 1))
    # log p + trust: [3, 2.5, 3, 0] - logsumexp: experts 0 and 2 tie above expert 1.
    assert sorted(indices[0].tolist()) == [0, 2]
    probs = torch.softmax(logits, -1)[0]
    expected = probs[[0, 2]] / probs[[0, 2]].sum()
    assert torch.allclose(weights[0].sort().values, expected.sort().values)


def test_report_rule_matches_its_formula_by_hand():
    table = TrustTable([0], ["c"], 4, prior=REPORT_PRIOR)
    table.trust[0, 0] = torch.tensor([0.5, 0.2, 0.9, 0.5])
    selector = TrustSelector(table, top_k=2, rule="report", alpha=0.3)
    selector.context = "c"
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [9.0, -9.0, 9.0, 9.0]])
    indices, weights = selector(logits, 0, torch.zeros(2, 3, dtype=torch.bfloat16))
    # combined from the first token: 0.3*[1, 2, 0, -1] + 0.7*[.5, .2, .9, .5]
    #   = [0.65, 0.74, 0.63, 0.05] -> experts 1, 0; weights 0.74/1.39, 0.65/1.39.
    assert indices.tolist() == [[1, 0], [1, 0]]  # the second token's logits are ignored
    assert weights.dtype == torch.bfloat16
    expected = torch.tensor([0.74 / 1.39, 0.65 / 1.39]).to(torch.bfloat16)
    assert torch.equal(weights, expected.expand(2, 2))


def test_update_changes_only_used_experts_in_that_layer_and_context():
    table = TrustTable([1, 4], CONTEXTS, 6)
    learner = TrustLearner(table, learning_rate=0.5)
    before = table.trust.clone()
    indices = torch.tensor([[0, 2], [2, 3], [0, 3]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    routing = {1: dense_routing(indices, weights, 6), 4: torch.zeros(3, 6)}
    # first update of a context: its own mean is the baseline, advantages [1, -1, 0]
    learner.update("reasoning", torch.tensor([1.0, 3.0, 2.0]), routing)
    changed = (table.trust != before).nonzero().tolist()
    assert changed == [[0, 1, 0], [0, 1, 2], [0, 1, 3]]
    # expert 0 served tokens 0 and 2 (w 0.7, 0.5; advantages 1, 0): target 0.7/1.2
    target0 = 0.7 / 1.2
    step0 = 0.5 * 2 * (1.2 / 3)
    assert table.trust[0, 1, 0].item() == pytest.approx(step0 * target0)
    assert table.counts[0, 1].tolist() == [2, 0, 2, 2, 0, 0]
    assert table.updates.tolist() == [0, 1, 0]
    assert learner.baseline["reasoning"] == pytest.approx(2.0)


def test_update_uses_a_running_baseline():
    table = TrustTable([0], ["c"], 2)
    learner = TrustLearner(table, learning_rate=0.1, baseline_momentum=0.5)
    routing = {0: dense_routing(torch.tensor([[0]]), torch.tensor([[1.0]]), 2)}
    learner.update("c", torch.tensor([2.0]), routing)
    assert table.trust[0, 0, 0].item() == 0.0  # advantage 0 against its own baseline
    info = learner.update("c", torch.tensor([1.0]), routing)  # 1 nat better than 2.0
    assert info["baseline_nll"] == 2.0
    assert table.trust[0, 0, 0].item() == pytest.approx(0.1 * 1.0)
    assert learner.baseline["c"] == pytest.approx(1.5)


def test_bad_inputs_are_named():
    table = TrustTable([0], ["c"], 4)
    with pytest.raises(ValueError, match="context 'x'"):
        table.context_pos("x")
    with pytest.raises(ValueError, match="layer 3"):
        table.layer_pos(3)
    with pytest.raises(ValueError, match="rule"):
        TrustSelector(table, 2, rule="mystery")
    selector = TrustSelector(table, 2)
    with pytest.raises(ValueError, match="context is not set"):
        selector(torch.zeros(1, 4), 0, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="routing must be"):
        table.credit(0, "c", torch.zeros(2, 3), torch.zeros(2), 0.1)


# --- persistence ------------------------------------------------------------------------


def learned_table(model=None):
    model = model or tiny_model()
    table = random_trust(TrustTable.for_model(model, CONTEXTS), seed=7)
    table.counts += 3
    table.updates += 2
    return table


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    table = learned_table(model)
    path = table.save(tmp_path / "trust.safetensors")
    loaded = TrustTable.load(path, config_hash=model.config.config_hash())
    assert loaded.layers == table.layers and loaded.contexts == table.contexts
    assert loaded.prior == table.prior and loaded.config_hash == table.config_hash
    for name in ("trust", "counts", "updates"):
        assert torch.equal(getattr(loaded, name), getattr(table, name))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_file_is_an_error_naming_it(tmp_path):
    path = learned_table().save(tmp_path / "trust.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte
    path.write_bytes(bytes(data))
    with pytest.raises(TrustStateError, match="checksum") as info:
        TrustTable.load(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"{not a safetensors header" + bytes(100))
    with pytest.raises(TrustStateError) as info:
        TrustTable.load(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_an_error_naming_it(tmp_path):
    path = learned_table().save(tmp_path / "trust.safetensors")
    data = path.read_bytes()
    for size in (len(data) - 7, len(data) // 2, 5, 0):
        path.write_bytes(data[:size])
        with pytest.raises(TrustStateError) as info:
            TrustTable.load(path)
        assert str(path) in str(info.value)


def test_trust_from_another_model_is_refused(tmp_path):
    path = learned_table().save(tmp_path / "trust.safetensors")
    other = ThinkerTextConfig(
        **{**CONFIG.to_dict(), "num_experts": 16, "mrope_section": (3, 3, 2), "mlp_only_layers": ()}
    )
    with pytest.raises(TrustStateError, match="config hash") as info:
        TrustTable.load(path, config_hash=other.config_hash())
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        TrustTable.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_report_rule_runs_in_the_model_with_one_choice_per_call(dtype):
    model = tiny_model(DTYPES[dtype])
    table = TrustTable.for_model(model, CONTEXTS, prior=REPORT_PRIOR)
    selector = TrustSelector.for_model(model, table, rule="report")
    selector.context = "code"
    model.set_selector(selector)
    with model.routing_trace() as trace:
        logits = model(torch.arange(9)[None])
    assert logits.dtype == DTYPES[dtype] and torch.isfinite(logits.float()).all()
    for layer in table.layers:
        indices, weights = trace[layer][0]
        assert (indices == indices[0]).all() and (weights == weights[0]).all()


# --- tests that a broken trust fails -------------------------------------------------------


@pytest.mark.parametrize(
    ("trust", "beta", "expected"),
    [
        # p = softmax([log .6, log .3, log .1]). Log space: log .1 + 2 * .45 = -1.40 < log .6;
        # probability space (p + beta * trust) would pick expert 2 (1.0 > 0.6).
        ([0.0, 0.0, 0.45], 2.0, 0),
        # log .3 + beta * .5 beats log .6 only when beta > 1.39: beta = 2 picks expert 1,
        # beta = 1 (a rule that ignores beta) would pick expert 0.
        ([0.0, 0.5, 0.0], 2.0, 1),
        ([0.0, 0.5, 0.0], 1.0, 0),
    ],
)
def test_bias_rule_is_log_space_and_uses_beta(trust, beta, expected):
    table = TrustTable([0], ["c"], 3)
    table.trust[0, 0] = torch.tensor(trust)
    selector = TrustSelector(table, top_k=1, rule="bias", beta=beta)
    selector.context = "c"
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    indices, _ = selector(logits, 0, torch.zeros(1, 1))
    assert indices.tolist() == [[expected]]


def test_learner_baseline_momentum_weighs_the_old_baseline_by_m():
    table = TrustTable([0], ["c"], 2)
    learner = TrustLearner(table, learning_rate=0.1, baseline_momentum=0.8)
    routing = {0: torch.tensor([[1.0, 0.0]])}
    learner.update("c", torch.tensor([2.0]), routing)  # first generation: its own baseline
    assert learner.baseline["c"] == pytest.approx(2.0)
    learner.update("c", torch.tensor([7.0]), routing)
    assert learner.baseline["c"] == pytest.approx(0.8 * 2.0 + 0.2 * 7.0)


def harmful_table(layer=0, context="code", expert=2, harm=1.0, n=5):
    table = TrustTable([layer], CONTEXTS, 6)
    for i in range(n):
        table.record_harm(layer, context, expert, harm + 0.01 * i)
    return table


def test_exclusion_removes_even_the_top_choice_and_gives_its_slot_to_the_next():
    table = harmful_table(expert=2)
    selector = TrustSelector(table, top_k=2, norm_topk_prob=True)
    selector.context = "code"
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, -1.0, 0.5]])  # expert 2 is the top choice
    indices, weights = selector(logits, 0, torch.zeros(1, 3))
    assert indices.tolist() == [[3, 1]]  # the router's 2nd and 3rd choices
    probs = torch.softmax(logits, -1)[0, [3, 1]]
    assert torch.allclose(weights[0], probs / probs.sum())


def test_evidence_in_one_context_leaves_the_others_at_the_routers_choice():
    table = harmful_table(context="code", expert=2)
    selector = TrustSelector(table, top_k=2, norm_topk_prob=True)
    router = RouterTopK(2, True)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 5, 6, generator=gen)
    logits[:, 2] += 4  # expert 2 is everyone's top choice
    hidden = torch.zeros(10, 3)
    want_i, want_w = router(logits, 0, hidden)
    for context in ("reasoning", "text"):
        selector.context = context
        got_i, got_w = selector(logits, 0, hidden)
        assert torch.equal(got_i, want_i) and torch.equal(got_w, want_w)
    selector.context = "code"
    assert not (selector(logits, 0, hidden)[0] == 2).any()
    # one context per sequence: sequence 0 is code (excluded), sequence 1 text (router)
    selector.context = ["code", "text"]
    got_i, got_w = selector(logits, 0, hidden)
    assert not (got_i[:5] == 2).any()
    assert torch.equal(got_i[5:], want_i[5:]) and torch.equal(got_w[5:], want_w[5:])


def test_exclusion_needs_a_lower_bound_above_zero():
    table = TrustTable([0], ["c"], 4)
    for harm in (1.0, -0.9, 1.1):  # positive mean, but the interval contains zero
        table.record_harm(0, "c", 1, harm)
    assert not table.harmful(0, "c").any()
    for harm in (0.5, 0.52, 0.49):
        table.record_harm(0, "c", 3, harm)
    assert table.harmful(0, "c").tolist() == [False, False, False, True]
    values = torch.tensor([0.5, 0.52, 0.49], dtype=torch.float64)
    assert float(table.harm_mean[0, 0, 3]) == pytest.approx(float(values.mean()), rel=1e-6)
    se = float(values.std() / values.numel() ** 0.5)
    assert float(table.harm_standard_error()[0, 0, 3]) == pytest.approx(se, rel=1e-4)
    assert float(table.harm_standard_error()[0, 0, 0]) == float("inf")


def test_oracle_selector_excludes_exactly_the_named_experts():
    table = TrustTable([0, 1], ["c", "d"], 6)
    oracle = OracleSelector(table, 2, True, {"c": {0: [2]}})
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, -1.0, 0.5]])
    oracle.context = "c"
    assert oracle(logits, 0, torch.zeros(1, 1))[0].tolist() == [[3, 1]]
    assert oracle(logits, 1, torch.zeros(1, 1))[0].tolist() == [[2, 3]]
    oracle.context = "d"
    assert oracle(logits, 0, torch.zeros(1, 1))[0].tolist() == [[2, 3]]


def trained_model_with_broken_expert(layer=1):
    """The embedded trained model with the most used expert of `layer` sign-flipped and
    scaled 8x: a known-harmful expert. Returns (model, expert, windows of real text)."""
    from sage_core.checkpoint import load_thinker
    from sage_core.corpus import load_corpus
    from sage_core.model.tokenizer import load_tokenizer
    from sage_core.paths import MODELS

    path = sorted(p.parent for p in MODELS.glob("*/config.json"))[0]
    model, tokenizer = load_thinker(path).eval(), load_tokenizer(path)
    corpus = load_corpus()
    docs = [d for c in CONTEXTS for d in corpus.documents(c, "train")[:8]]
    windows = [torch.tensor(tokenizer.encode(d)[:48], dtype=torch.int64) for d in docs]
    with torch.no_grad(), model.routing_trace() as trace:
        for ids in windows:
            model(ids[None])
    usage = sum(
        torch.bincount(i.reshape(-1), minlength=model.config.num_experts) for i, _ in trace[layer]
    )
    expert = int(usage.argmax())
    with torch.no_grad():
        model.sparse_blocks()[layer].experts.down_proj[expert] *= -8.0
    return model, expert, windows


def window_nll(model, ids):
    """Mean NLL of every next-token prediction of (1, S) `ids`, from the model's logits
    and a log-softmax written here: a reference independent of `continuation_nll`."""
    logits = model(ids)[0].double()  # (S, V)
    logp = logits[:-1] - logits[:-1].logsumexp(-1, keepdim=True)
    return float(-logp.gather(1, ids[0, 1:, None]).mean().detach())


def direct_harm(model, ids, removed, layer, expert):
    """NLL of every next-token prediction of `ids` (1, S) with (layer, expert) in minus
    with it out, the experts `removed` ((L, E) bool over the sparse layers) out in both;
    each run as its own forward of one sequence."""
    c = model.config
    layers = sorted(model.sparse_blocks())
    scores = []
    with torch.no_grad():
        for out in (False, True):
            masks = {lyr: removed[i][None].clone() for i, lyr in enumerate(layers)}
            masks[layer][0, expert] = out
            selector = AblationSelector(c.num_experts_per_tok, c.norm_topk_prob, masks, 1)
            model.set_selector(selector)
            scores.append(window_nll(model, ids))
        model.set_selector(None)
    return scores[0] - scores[1]


def test_counterfactual_estimate_converges_to_the_ablation_effect():
    # Hand-built: a random model whose every served cell is ablated in every window; the
    # running mean must equal the mean of the directly measured effects of removing the
    # expert (or, once it is suspected, of putting it back), each from its own forwards.
    model = tiny_model()
    table = TrustTable.for_model(model, CONTEXTS)
    learner = CounterfactualLearner(table, ablations_per_window=CONFIG.num_experts * 3)
    gen = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, CONFIG.vocab_size, (16,), generator=gen) for _ in range(6)]
    effects, put_back = {}, 0
    for ids in windows:
        removed = learner.suspected("code").clone()
        put_back += int(removed.sum())
        want = {
            (layer, e): direct_harm(model, ids[None], removed, layer, e)
            for layer in table.layers
            for e in range(CONFIG.num_experts)
        }
        for layer, e, harm in learner.update(model, ids[:8], ids[8:], "code")["cells"]:
            assert harm == pytest.approx(want[(layer, e)], abs=1e-5)
            effects.setdefault((layer, e), []).append(want[(layer, e)])
    assert any(abs(e) > 1e-5 for values in effects.values() for e in values)
    assert put_back > 0  # some measurements were of putting a suspected expert back
    for (layer, e), values in effects.items():
        li = table.layer_pos(layer)
        assert int(table.harm_count[li, 0, e]) == len(values)
        mean = float(table.harm_mean[li, 0, e])
        assert mean == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert not table.harm_count[:, 1:].any()  # nothing learned for the other contexts
    # With a zero output head every window's NLL is log(V) whatever the routing: the known
    # effect of every ablation is exactly 0, so the estimate is 0 and nothing is excluded.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    flat = TrustTable.for_model(model, CONTEXTS)
    info = CounterfactualLearner(flat, 8).update(model, windows[0][:8], windows[0][8:], "text")
    assert len(info["cells"]) == 8 and flat.harm_count.sum() == 8 and not flat.harm_mean.any()


def test_counterfactual_ablates_only_experts_that_served_the_window():
    model = tiny_model()
    table = TrustTable.for_model(model, CONTEXTS)
    learner = CounterfactualLearner(table, ablations_per_window=CONFIG.num_experts * 3)
    ids = torch.arange(10)
    with torch.no_grad(), model.routing_trace() as trace:
        model(ids[None])
    served = {(layer, int(e)) for layer, calls in trace.items() for e in calls[0][0][:9].unique()}
    cells = {(layer, e) for layer, e, _ in learner.update(model, ids[:5], ids[5:], "code")["cells"]}
    assert cells == served
    assert len(served) < len(table.layers) * CONFIG.num_experts  # some expert served nothing


def test_pooled_evidence_needs_the_context_to_agree():
    # Expert 1 harms clearly when every context's ablations are pooled; in context "a"
    # its own mean is positive (excluded there, with the pooled evidence), in "b" its own
    # mean is negative (kept: the direction is each context's own).
    table = TrustTable([0], ["a", "b", "c"], 4)
    for context, values in (
        ("a", (0.3, 0.1, 0.4)),
        ("b", (0.1, -0.3, 0.1)),
        ("c", (0.5, 0.6, 0.55, 0.45)),
    ):
        for v in values:
            table.record_harm(0, context, 1, v)
    own = {c: bool(table.harmful(0, c, pool_contexts=False)[1]) for c in "abc"}
    pooled = {c: bool(table.harmful(0, c)[1]) for c in "abc"}
    assert own == {"a": False, "b": False, "c": True}
    assert pooled == {"a": True, "b": False, "c": True}
    n, mean, _ = table.pooled_harm()
    values = [0.3, 0.1, 0.4, 0.1, -0.3, 0.1, 0.5, 0.6, 0.55, 0.45]
    assert int(n[0, 1]) == len(values)
    assert float(mean[0, 1]) == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_harm_p_values_are_one_sided_t_tests():
    table = TrustTable([0], ["c"], 3)
    values = [0.2, -0.1, 0.35, 0.05]
    for v in values:
        table.record_harm(0, "c", 2, v)
    table.record_harm(0, "c", 1, 5.0)  # one measurement: no test
    want = scipy.stats.ttest_1samp(values, 0.0, alternative="greater").pvalue
    p = table.harm_p_values()[0, 0]
    assert float(p[2]) == pytest.approx(want, rel=1e-5)
    assert float(p[1]) == 1.0 and float(p[0]) == 1.0


def test_counterfactual_learning_finds_a_broken_expert_and_routes_around_it():
    model, expert, windows = trained_model_with_broken_expert(layer=1)
    table = TrustTable.for_model(model, CONTEXTS)
    learner = CounterfactualLearner(table, ablations_per_window=32)
    for ids in windows:
        learner.update(model, ids[:24], ids[24:], "code")
    li = table.layer_pos(1)
    assert float(table.harm_mean[li, 0, expert]) > 0
    assert bool(table.harmful(1, "code")[expert])
    selector = TrustSelector.for_model(model, table)
    for context, avoided in (("code", True), ("text", False)):
        selector.context = context
        model.set_selector(selector)
        with torch.no_grad(), model.routing_trace() as trace:
            model(windows[0][None])
        model.set_selector(None)
        assert (trace[1][0][0] == expert).any() != avoided


def test_counterfactual_cost_is_counted():
    model = tiny_model()
    table = TrustTable.for_model(model, CONTEXTS)
    learner = CounterfactualLearner(table, ablations_per_window=3)
    ids = torch.arange(12)
    info = learner.update(model, ids[:6], ids[6:], "text")
    assert len(info["cells"]) == 3
    assert learner.sequence_forwards == 3 + 1
    assert float(table.harm_count.sum()) == 3


def test_learned_bias_starts_as_the_router_and_learns_to_avoid_a_broken_expert():
    model, expert, windows = trained_model_with_broken_expert(layer=1)
    E = model.config.num_experts
    selector = LearnedBiasSelector.for_model(model, CONTEXTS)
    router = RouterTopK(model.config.num_experts_per_tok, model.config.norm_topk_prob)
    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(2))
    selector.context = "code"
    got, want = selector(logits, 1, torch.zeros(5, 4)), router(logits, 1, torch.zeros(5, 4))
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])
    learner = LearnedBiasLearner(selector, learning_rate=0.1, l2=1e-4)
    for ids in windows * 2:
        learner.update(model, ids[:24], ids[24:], "code")
    bias = selector.bias.detach()
    li = selector.layers.index(1)
    assert float(bias[li, 0, expert]) < float(bias[li, 0].median())
    assert not bias[:, 1:].any()  # other contexts untouched
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_schema_version_1_files_are_refused_with_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    table = TrustTable([0], ["c"], 4)
    save_file(
        {n: getattr(table, n) for n in ("trust", "counts", "updates")},
        str(path),
        metadata={"schema_version": "1", "kind": "sage_core.TrustTable"},
    )
    with pytest.raises(TrustStateError, match="schema_version '1'") as info:
        TrustTable.load(path)
    assert str(path) in str(info.value)


def test_harm_statistics_survive_save_and_load(tmp_path):
    table = harmful_table()
    loaded = TrustTable.load(table.save(tmp_path / "t.safetensors"))
    for name in ("harm_mean", "harm_m2", "harm_count"):
        assert torch.equal(getattr(loaded, name), getattr(table, name))
    assert torch.equal(loaded.harmful(0, "code"), table.harmful(0, "code"))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"ablations_per_window": 0}, "ablations_per_window"),
        ({"alpha": 1.0}, "alpha"),
        ({"explore": -1.0}, "explore"),
        ({"explore": float("nan")}, "explore"),
        ({"min_ablations": 1}, "min_ablations"),
    ],
)
def test_counterfactual_learner_names_a_bad_setting(kwargs, name):
    table = TrustTable([0], ["c"], 4)
    with pytest.raises(ValueError, match=name):
        CounterfactualLearner(table, **kwargs)


def test_choose_cells_explores_the_uncertain_cell_when_one_ablation_is_allowed():
    # Cell 1: ten measurements, mean 0.05, SE ~0.03 (not shown harmful). Cell 2: two
    # measurements, mean 0, SE 0.5. Optimism (mean + explore * SE) prefers the uncertain
    # cell; without exploration the better mean wins.
    table = TrustTable([0], ["c"], 4)
    for v in (0.15, -0.05) * 5:
        table.record_harm(0, "c", 1, v)
    for v in (0.5, -0.5):
        table.record_harm(0, "c", 2, v)
    assert not table.harmful(0, "c").any()
    candidates = torch.tensor([[False, True, True, False]])
    curious = CounterfactualLearner(table, ablations_per_window=1, explore=1.0)
    greedy = CounterfactualLearner(table, ablations_per_window=1, explore=0.0)
    assert curious.choose_cells("c", candidates) == [(0, 2)]
    assert greedy.choose_cells("c", candidates) == [(0, 1)]


def test_benjamini_hochberg_excludes_two_experts_that_bonferroni_would_keep():
    # Two experts at p = 0.02 among four: BH at 5% selects both (0.02 <= 2/4 * 0.05),
    # Bonferroni neither (4 * 0.02 > 0.05).
    t = scipy.stats.t.isf(0.02, 2)  # three measurements: mean / (sd / sqrt(3)) = t
    table = TrustTable([0], ["c"], 4)
    for e in (0, 3):
        for v in (-1.0, 0.0, 1.0):
            table.record_harm(0, "c", e, t / 3**0.5 + v)
    for e in (1, 2):
        for v in (-0.5, 0.0, 0.4):
            table.record_harm(0, "c", e, v)
    p = table.harm_p_values()[0, 0]
    assert float(p[0]) == pytest.approx(0.02, rel=1e-4) and float(p[3]) == float(p[0])
    assert table.harmful(0, "c", alpha=0.05).tolist() == [True, False, False, True]


def test_identical_measurements_are_significant_only_when_positive():
    # Zero standard error (values exact in float32): a positive mean gives p = 0, a zero
    # or negative mean p = 1.
    table = TrustTable([0], ["c"], 3)
    for _ in range(3):
        table.record_harm(0, "c", 0, -0.25)
        table.record_harm(0, "c", 1, 0.25)
        table.record_harm(0, "c", 2, 0.0)
    assert float(table.harm_standard_error()[0, 0, 0]) == 0.0
    assert table.harm_p_values()[0, 0].tolist() == [1.0, 0.0, 1.0]
    assert table.harmful(0, "c").tolist() == [False, True, False]


def test_removal_changes_are_the_layers_exact_output_change():
    # For every token and slot: the block's output with that expert removed from that
    # token (its slot to the next choice, weights renormalised) minus the output as routed.
    model = tiny_model()
    block = model.sparse_blocks()[sorted(model.sparse_blocks())[0]]
    c = model.config
    x = torch.randn(6, c.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = torch.softmax(block.gate(x), -1)
        candidates = probs.topk(c.num_experts_per_tok + 1, -1).indices
        outputs = _expert_outputs(x, candidates, block.experts)
        changes = removal_changes(probs, candidates, outputs, c.norm_topk_prob)
        base = block(x[None])[0][0]
        for t in range(x.shape[0]):
            for j in range(c.num_experts_per_tok):
                mask = torch.zeros(1, c.num_experts, dtype=torch.bool)
                mask[0, candidates[t, j]] = True
                block.selector = AblationSelector(
                    c.num_experts_per_tok, c.norm_topk_prob, {block.layer_idx: mask}, 1
                )
                without = block(x[t : t + 1][None])[0][0, 0]
                torch.testing.assert_close(changes[t, j], without - base[t], atol=1e-5, rtol=1e-4)
        model.set_selector(None)


def test_attribution_matches_real_ablations_where_effects_are_small():
    # Experts scaled down: removing one moves the residual stream a little, where the
    # first-order estimate must agree with the directly measured harm, rank and size.
    model = tiny_model()
    with torch.no_grad():
        for block in model.sparse_blocks().values():
            block.experts.down_proj.mul_(0.2)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 14), generator=torch.Generator().manual_seed(4))
    est = attribution_estimates(model, ids, {})
    layers = sorted(model.sparse_blocks())
    removed = torch.zeros(len(layers), CONFIG.num_experts, dtype=torch.bool)
    for b in range(2):
        assert est["nll"][b] == pytest.approx(window_nll(model, ids[b : b + 1]), abs=1e-5)
        served = est["served"][b].nonzero().tolist()
        assert served and len(served) < len(layers) * CONFIG.num_experts
        true = torch.tensor(
            [direct_harm(model, ids[b : b + 1], removed, layers[li], e) for li, e in served]
        )
        guess = torch.tensor([float(est["harm"][b, li, e]) for li, e in served])
        assert true.abs().max() > 3e-5  # well above float32 rounding of the NLL
        # Most cells agree to 1% of the largest effect; a few differ where removing an
        # expert flips a later layer's top-k (a jump no gradient sees).
        close = (guess - true).abs() <= 0.01 * true.abs().max() + 0.01 * true.abs()
        assert float(close.double().mean()) >= 0.85, (guess, true)
        assert scipy.stats.spearmanr(guess, true).statistic > 0.95
        assert not est["harm"][b][~est["served"][b]].any()


def test_attribution_learner_verifies_before_it_excludes_and_counts_its_passes():
    model, expert, windows = trained_model_with_broken_expert(layer=1)
    table = TrustTable.for_model(model, CONTEXTS)
    learner = AttributionLearner(table, verify_per_window=2)
    ids = torch.stack(windows[:4])
    info = learner.update_batch(model, ids, ["code"] * 4)
    assert learner.sequence_forwards == 4 + 8 and learner.sequence_backwards == 4
    assert len(info["cells"]) == 8 and float(table.harm_count.sum()) == 8
    assert float(learner.estimates.harm_count.sum()) > 8  # every served cell estimated
    li = table.layer_pos(1)
    # the broken expert has the largest estimated harm of its layer, so it is verified first
    assert int(learner.estimates.harm_mean[li, 0].argmax()) == expert
    assert (1, expert) in {(layer, e) for _, layer, e, _ in info["cells"]}
    for start in range(4, len(windows), 4):
        learner.update_batch(model, torch.stack(windows[start : start + 4]), ["code"] * 4)
    assert bool(table.harmful(1, "code")[expert])
    # estimates alone never exclude: a table with estimates and no measurements excludes nothing
    unverified = AttributionLearner(TrustTable.for_model(model, CONTEXTS), verify_per_window=1)
    unverified.estimates = learner.estimates
    assert not unverified.table.harmful(1, "code").any()
