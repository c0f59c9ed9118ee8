"""The MoE block: grouped experts, the selector hook, expert providers, auxiliary loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

from sage_core.model import moe
from sage_core.model.config import ThinkerTextConfig
from sage_core.model.moe import (
    ResidentExperts,
    RouterTopK,
    gathered_expert_mix,
    gathered_expert_mix_reduce,
    grouped_expert_mix,
    load_balancing_loss,
    single_token_expert_mix,
)
from sage_core.model.thinker import Qwen3OmniThinker

E, H, INTER = 8, 32, 16

CONFIG = ThinkerTextConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=3,
    rope_theta=10_000.0,
    mrope_section=(2, 3, 3),
    mlp_only_layers=(1,),
)


def random_experts(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    experts = ResidentExperts(E, H, INTER)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.3 * torch.randn(E, 2 * INTER, H, generator=g))
        experts.down_proj.copy_(0.3 * torch.randn(E, H, INTER, generator=g))
    return experts.to(dtype)


def naive_mix(x, indices, weights, experts):
    """The original design: a Python loop over tokens and their chosen experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            gate_up, down = experts.expert(int(indices[t, j]))
            gate, up = (gate_up @ x[t]).chunk(2)
            out[t] += weights[t, j] * (down @ (F.silu(gate) * up))
    return out


def random_choice(T, k, seed):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return indices, torch.rand(T, k, generator=g)


@pytest.mark.parametrize("T, k", [(1, 1), (1, 3), (7, 2), (40, 3), (5, 8)])
def test_grouped_and_gathered_experts_equal_a_per_token_loop(T, k):
    experts = random_experts()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    indices, weights = random_choice(T, k, seed=k)
    with torch.no_grad():
        expected = naive_mix(x, indices, weights, experts)
        torch.testing.assert_close(grouped_expert_mix(x, indices, weights, experts), expected)
        torch.testing.assert_close(gathered_expert_mix(x, indices, weights, experts), expected)
        reduced = gathered_expert_mix_reduce(x, indices, weights, experts)
        torch.testing.assert_close(reduced, expected)
        if T == 1:
            single = single_token_expert_mix(x, indices, weights, experts)
            torch.testing.assert_close(single, expected)
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("bad", [E, -1])
@pytest.mark.parametrize("path", ["grouped", "grouped_mm", "single_token", "gathered"])
def test_an_expert_index_out_of_range_is_one_clear_error_on_every_path(monkeypatch, path, bad):
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    block = moe.SparseMoeBlock(CONFIG, layer_idx=2)
    block.gate = nn.Linear(H, E, bias=False)
    block.experts = random_experts()
    ran = []  # which expert path each forward took
    paths = ("grouped_expert_mix", "grouped_mm_expert_mix", "single_token_expert_mix")
    for name in (*paths, "gathered_expert_mix"):
        mix = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _mix=mix: ran.append(_n) or _mix(*a))
    if path == "gathered":  # the CUDA few-token path, forced on CPU
        monkeypatch.setattr(moe, "GATHER_DEVICES", ("cpu",))
    if path == "grouped":  # the per-expert loop, where torch._grouped_mm is not used
        monkeypatch.setattr(moe, "GROUPED_MM_DEVICES", ())
    last_expert = [0]

    def selector(router_logits, layer_idx, hidden_states):
        indices = torch.zeros(hidden_states.shape[0], 2, dtype=torch.int64)
        indices[-1, 1] = last_expert[0]
        return indices, torch.full(indices.shape, 0.5)

    object.__setattr__(block, "selector", selector)
    x = torch.randn(1, 1 if path == "single_token" else 3, H)
    with torch.no_grad():
        block(x)  # in range: the path under test runs
        assert ran == [f"{path}_expert_mix"]
        last_expert[0] = bad
        message = rf"layer 2 chose expert {bad}, outside the valid range \[0, {E}\)"
        with pytest.raises(ValueError, match=message):
            block(x)
    assert ran == [f"{path}_expert_mix"]  # rejected before any expert ran


def test_grouped_experts_with_autograd_equal_the_inference_path_and_have_gradients():
    """Grad mode concatenates per-expert outputs; no_grad writes them into one buffer."""
    experts = random_experts()
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3), requires_grad=True)
    indices, weights = random_choice(9, 3, seed=5)
    with torch.no_grad():
        inference = grouped_expert_mix(x, indices, weights, experts)
    trained = grouped_expert_mix(x, indices, weights, experts)
    torch.testing.assert_close(trained, inference, rtol=0, atol=0)
    trained.square().sum().backward()
    expected = naive_mix(x, indices, weights, experts)
    grads = torch.autograd.grad(expected.square().sum(), [x, experts.down_proj])
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(experts.down_proj.grad, grads[1], rtol=1e-4, atol=1e-4)
    assert experts.down_proj.grad.abs().max() > 0


def test_reused_cpu_buffers_never_leak_one_call_into_the_next():
    experts = random_experts()
    moe.release_workspace()
    results, pointers = [], set()
    for T in (30, 4, 30, 17):  # grow, shrink, grow back: the buffer is reused, never resized down
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        indices, weights = random_choice(T, 3, seed=T)
        with torch.no_grad():
            out = grouped_expert_mix(x, indices, weights, experts)
        pointers.add(moe._WORKSPACE.buffers[("ys", torch.float32)].data_ptr())
        results.append(out)
        torch.testing.assert_close(out, naive_mix(x, indices, weights, experts))
    assert len(pointers) == 1
    assert torch.equal(results[0], results[2])  # same input, same bits, after other calls
    moe.release_workspace()
    assert moe._WORKSPACE.buffers == {}


def test_reused_buffers_work_across_inference_mode_and_no_grad():
    experts = random_experts()
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(6))
    indices, weights = random_choice(6, 2, seed=6)
    expected = naive_mix(x, indices, weights, experts).detach()
    moe.release_workspace()
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            torch.testing.assert_close(grouped_expert_mix(x, indices, weights, experts), expected)
    moe.release_workspace()


def test_grouped_experts_run_one_matmul_pair_per_used_expert():
    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.num_experts, self.calls = inner, inner.num_experts, []

        def expert(self, e):
            self.calls.append(e)
            return self.inner.expert(e)

    provider = Counting(random_experts())
    indices = torch.tensor([[3, 1], [1, 5], [3, 5], [1, 3]])
    grouped_expert_mix(torch.randn(4, H), indices, torch.rand(4, 2), provider)
    assert provider.calls == [1, 3, 5]  # each used expert once, unused ones never


def test_bfloat16_experts_stay_bfloat16():
    experts = random_experts(dtype=torch.bfloat16)
    x = torch.randn(6, H, dtype=torch.bfloat16)
    indices, weights = random_choice(6, 2, seed=1)
    with torch.no_grad():
        out = grouped_expert_mix(x, indices, weights.bfloat16(), experts)
        ref = naive_mix(x.float(), indices, weights, random_experts())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_router_topk_matches_transformers_router_math():
    logits = torch.randn(10, E, generator=torch.Generator().manual_seed(2))
    for norm in (True, False):
        indices, weights = RouterTopK(3, norm)(logits, 0, torch.zeros(10, H))
        probs = logits.softmax(-1)
        top, top_idx = probs.topk(3, -1)
        assert torch.equal(indices, top_idx) and indices.dtype == torch.int64
        torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True) if norm else top)
    _, w16 = RouterTopK(2, True)(logits.bfloat16(), 0, torch.zeros(10, H, dtype=torch.bfloat16))
    assert w16.dtype == torch.bfloat16


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = Qwen3OmniThinker(CONFIG, layer_indices=[0, 1, 3])
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return m.eval()


def ids(seed=0, shape=(2, 6)):
    return torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_selector_hook_sees_per_token_logits_and_layer_index(model):
    calls = []

    def recorder(router_logits, layer_idx, hidden_states):
        calls.append((layer_idx, router_logits.clone(), hidden_states.shape))
        return RouterTopK(3, True)(router_logits, layer_idx, hidden_states)

    tokens = ids()
    with torch.no_grad():
        expected, router_logits = model(tokens, output_router_logits=True)
        model.set_selector(recorder)
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # Sparse layers only (layer 1 is dense), in layer order, original indices.
    assert [c[0] for c in calls] == [0, 3]
    assert all(c[1].shape == (12, 8) and c[2] == (12, 64) for c in calls)
    assert len(router_logits) == 2
    for (_, seen, _), returned in zip(calls, router_logits, strict=True):
        torch.testing.assert_close(seen, returned, atol=0, rtol=0)


def test_selector_choice_is_what_runs(model):
    tokens = ids(1)
    layer0 = model.model.layers["0"].mlp

    def only_expert_5(router_logits, layer_idx, hidden_states):
        T = router_logits.shape[0]
        return (
            torch.full((T, 1), 5, dtype=torch.int64),
            torch.full((T, 1), 0.5, dtype=hidden_states.dtype),
        )

    model.set_selector(only_expert_5)
    h = torch.randn(1, 4, 64)
    with torch.no_grad():
        out, _ = layer0(h)
        gate_up, down = layer0.experts.expert(5)
        gate, up = (h @ gate_up.T).chunk(2, -1)
        torch.testing.assert_close(out, 0.5 * (F.silu(gate) * up) @ down.T)
        with model.routing_trace() as trace:
            model(tokens)
    assert set(trace) == {0, 3}
    assert all(torch.equal(i, torch.full((12, 1), 5)) for i, _ in trace[0] + trace[3])
    model.set_selector(None)
    with torch.no_grad(), model.routing_trace() as trace:
        model(tokens)
    assert trace[0][0][0].shape == (12, 3) and not torch.all(trace[0][0][0] == 5)


def test_selector_with_wrong_dtype_or_shape_is_a_clear_error(model):
    def float64_weights(router_logits, layer_idx, hidden_states):
        idx, w = RouterTopK(3, True)(router_logits, layer_idx, hidden_states)
        return idx, w.double()

    model.set_selector(float64_weights)
    with pytest.raises(ValueError, match="layer 0 .*dtype torch.float64"):
        model(ids())

    def out_of_range(router_logits, layer_idx, hidden_states):
        T = router_logits.shape[0]
        return torch.full((T, 1), 8), torch.ones(T, 1)

    model.set_selector(out_of_range)
    with pytest.raises(ValueError, match="expert 8"):
        model(ids())


def test_routing_trace_records_each_forward_on_cpu(model):
    with torch.no_grad(), model.routing_trace() as trace:
        model(ids(2, (1, 5)))
        model(ids(3, (1, 4)))
    assert [i.shape for i, _ in trace[3]] == [(5, 3), (4, 3)]
    assert all(w.device.type == "cpu" and w.dtype == torch.float32 for _, w in trace[0])
    torch.testing.assert_close(trace[0][0][1].sum(-1), torch.ones(5))  # norm_topk_prob
    with torch.no_grad():
        model(ids(2, (1, 5)))
    assert len(trace[3]) == 2  # recording stopped with the context


class OnDemandOnly(nn.Module):
    """A provider with expert() only, holding at most one expert like a tiny LRU cache."""

    def __init__(self, resident: ResidentExperts):
        super().__init__()
        self.num_experts = resident.num_experts
        self._source = (resident.gate_up_proj.detach().clone(), resident.down_proj.detach().clone())
        self.requested = []

    def expert(self, e):
        self.requested.append(e)
        return self._source[0][e].clone(), self._source[1][e].clone()


def test_provider_with_expert_only_gives_resident_outputs(model):
    tokens = ids(4)
    with torch.no_grad():
        expected_prefill = model(tokens)
        cache = model.new_cache(2, 8)
        model(tokens, cache=cache)
        expected_decode = model(ids(5, (2, 1)), cache=cache)
    for i in (0, 3):
        model.model.layers[str(i)].mlp.experts = OnDemandOnly(
            model.model.layers[str(i)].mlp.experts
        )
    assert not any("experts" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected_prefill, atol=1e-5, rtol=0)
        cache = model.new_cache(2, 8)
        model(tokens, cache=cache)
        torch.testing.assert_close(
            model(ids(5, (2, 1)), cache=cache), expected_decode, atol=1e-5, rtol=0
        )
    assert model.model.layers["0"].mlp.experts.requested


def test_load_balancing_loss_matches_transformers():
    g = torch.Generator().manual_seed(3)
    logits = tuple(torch.randn(20, E, generator=g) for _ in range(3))
    for top_k in (1, 2, 3):
        expected = hf.load_balancing_loss_func(logits, E, top_k)
        torch.testing.assert_close(load_balancing_loss(logits, E, top_k), expected)
    # Uniform router probabilities give exactly 1 per top-k slot; a collapsed router more.
    uniform = (torch.zeros(E, E),)
    assert load_balancing_loss(uniform, E, 2).item() == pytest.approx(2.0)
    collapsed = (torch.tensor([[9.0] + [0.0] * (E - 1)] * 16),)
    assert load_balancing_loss(collapsed, E, 1).item() > 4
    # Differentiable in the logits (it is a training loss).
    leaf = logits[0].clone().requires_grad_()
    load_balancing_loss((leaf,), E, 2).backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="router_logits"):
        load_balancing_loss((), E, 2)
