"""Trust table, selector rules, update rule and persistence (sage_core.trust)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_core.model.config import ThinkerTextConfig
from sage_core.model.moe import RouterTopK
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.trust import (
    REPORT_PRIOR,
    TrustLearner,
    TrustSelector,
    TrustStateError,
    TrustTable,
    dense_routing,
)

CONTEXTS = ("code", "reasoning", "text")
CONFIG = ThinkerTextConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=0,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    mrope_section=(3, 3, 2),
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
)
def test_neutral_trust_is_router_topk_on_every_layer(
    seed, tokens, num_experts, data, dtype, norm_topk_prob, prior, beta, coarse
):
    top_k = data.draw(st.integers(1, num_experts))
    layers = [0, 2, 5]
    table = TrustTable(layers, CONTEXTS, num_experts, prior=prior)
    selector = TrustSelector(table, top_k, norm_topk_prob, rule="bias", beta=beta)
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
    selector = TrustSelector.for_model(model, table, beta=beta)
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
    selector = TrustSelector.for_model(model, table, beta=1.0)
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
    selector = TrustSelector(table, top_k=2, norm_topk_prob=True, beta=1.0)
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
