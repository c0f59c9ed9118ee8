"""sage_core.dtypes.strict_mode.strict: the dtype policy enforced op by op.

The two bugs of the report are caught at their first bad op, the fixed model runs clean
in every activation dtype, each rule of the policy fails when broken, and nothing stays
installed after the context ends.
"""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sage_core.dtypes import (
    DELIBERATE_SITES,
    DtypePolicyError,
    parse_dtype,
    strict,
    to_numpy_float32,
    to_torch_like,
)
from sage_core.model.generation import generate, perplexity
from sage_core.model.moe import load_balancing_loss
from sage_core.model.thinker import Qwen3OmniThinker
from sage_core.studies.dtype_audit import AUDIT_CONFIG
from sage_core.studies.repro import rope_buffer as rb
from sage_core.studies.repro import sklearn_boundary as sb
from sage_core.trust.classifier import ContextClassifier

CFG = AUDIT_CONFIG  # one dense layer, one sparse: both MLP paths run
ACTIVATIONS = [torch.float32, torch.bfloat16, torch.float64]


def tiny_model(dtype=torch.float32) -> Qwen3OmniThinker:
    model = Qwen3OmniThinker(CFG)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    return model.to(dtype).eval()


def ids(shape=(2, 6), seed=1):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def no_mode_active() -> bool:
    return not torch.overrides._get_current_function_mode_stack()


# -- the report's two bugs, caught at their first bad op -------------------------------------


@pytest.fixture(scope="module")
def polluted_block(tmp_path_factory):
    """Bug #1: the pre-fix block with its inv_freq buffer assigned float64 from a checkpoint."""
    file = tmp_path_factory.mktemp("rope") / "block.safetensors"
    rb.write_checkpoint(rb.make_block("pre-fix"), file)
    return rb.load_block("pre-fix", file, "load_state_dict(sd, assign=True)")


def test_bug1_caught_at_torch_outer(polluted_block):
    assert polluted_block.rope.inv_freq.dtype == torch.float64
    with pytest.raises(DtypePolicyError) as info, strict(torch.float32, model=polluted_block):
        polluted_block(rb.make_input())
    err = info.value
    assert err.op == "torch.outer"
    assert err.inputs == ("float32", "float64") and err.output == "float64"
    assert "rope (PreFixRotaryEmbedding)" in err.where
    assert "torch.outer" in str(err) and "float64" in str(err) and "float32" in str(err)


def test_bug1_without_strict_fails_only_at_attention(polluted_block):
    """What the report saw: nothing until SDPA, several ops later."""
    with pytest.raises(RuntimeError, match="Expected query, key, and value to have the same"):
        polluted_block(rb.make_input())


def test_bug2_caught_at_the_sklearn_boundary():
    embeddings, labels = sb.report_training_data(40, 16)
    with pytest.raises(DtypePolicyError) as info, strict(torch.float32):
        sb.fit_report_classifier(embeddings, labels)
    err = info.value
    assert err.op == "Tensor.__array__"
    assert err.where.startswith("sklearn.")
    assert (err.inputs, err.output) == (("float32",), "float64")


def test_bug2_hard_coded_float32_weights_caught_at_creation():
    hidden = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    with pytest.raises(DtypePolicyError) as info, strict(torch.bfloat16):
        sb.selection_weights_report([0.5, 0.3, 0.2], hidden)
    assert info.value.op == "torch.tensor" and info.value.output == "float32"
    with strict(torch.bfloat16):  # the fix: the hidden states' dtype
        assert to_torch_like([0.5, 0.3, 0.2], hidden).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ACTIVATIONS, ids=lambda d: str(d).removeprefix("torch."))
def test_fixed_classifier_path_is_clean(dtype):
    embeddings, _ = sb.report_training_data(40, 16)
    x = embeddings.to(dtype)
    with strict(dtype):
        classifier = ContextClassifier(3).fit(x)
        predicted = classifier.predict(x)
    assert classifier.centers_.dtype == np.float32 and predicted.dtype == np.int64


# -- the fixed model, in every activation dtype --------------------------------------------


@pytest.mark.parametrize("dtype", ACTIVATIONS, ids=lambda d: str(d).removeprefix("torch."))
def test_model_entry_points_follow_the_policy(dtype):
    model = tiny_model(dtype)
    x = ids()
    with strict(dtype, model=model):
        logits, router = model(x, output_router_logits=True)
        hidden = model.hidden_states(x, position_ids=torch.arange(6).expand(3, 2, 6))
        greedy = generate(model, x, 3)
        sampled = generate(model, x, 3, temperature=0.8, top_p=0.9, seed=0)
        ppl = perplexity(model, x[0], window=4, stride=2)
        load_balancing_loss(router, CFG.num_experts, CFG.num_experts_per_tok)
    assert logits.dtype == hidden.dtype == dtype and all(r.dtype == dtype for r in router)
    assert greedy.dtype == sampled.dtype == torch.int64
    assert np.isfinite(ppl.perplexity)


def test_activation_dtype_defaults():
    assert strict(model=tiny_model(torch.bfloat16)).activation == torch.bfloat16
    assert strict().activation == torch.get_default_dtype()


# -- each rule fails when broken -------------------------------------------------------------


def test_mixed_promotion_is_named():
    a, b = torch.ones(3, dtype=torch.bfloat16), torch.ones(3)
    with pytest.raises(DtypePolicyError, match=r"Tensor\.mul .*\(bfloat16, float32\) -> float32"):
        with strict(torch.bfloat16):
            a * b
    assert issubclass(DtypePolicyError, TypeError)


def test_float64_is_never_allowed_even_explicitly():
    with pytest.raises(DtypePolicyError, match=r"Tensor\.double.*float64, which is never"):
        with strict(torch.float32):
            torch.ones(2).double()
    with strict(torch.float64):  # unless it is the activation dtype
        torch.ones(2, dtype=torch.float64).sum()


def test_explicit_float32_outside_a_deliberate_site_is_an_error():
    with pytest.raises(DtypePolicyError, match="outside a deliberate float32 site"):
        with strict(torch.bfloat16):
            torch.ones(2, dtype=torch.bfloat16).to(torch.float32)


def test_softmax_with_explicit_float32_is_deliberate():
    x = torch.randn(2, 4).to(torch.bfloat16)
    with strict(torch.bfloat16):
        probs = torch.softmax(x, dim=-1, dtype=torch.float32)
        F.log_softmax(x, -1, dtype=torch.float32)
        top = probs.topk(2, dim=-1).values  # carried: float32 in, float32 out
    assert top.dtype == torch.float32
    with pytest.raises(DtypePolicyError), strict(torch.bfloat16):
        torch.softmax(x.to(torch.float64), dim=-1, dtype=torch.float32)  # the .to fails


def test_carried_dtype_is_not_an_error_but_mixing_it_is():
    buffer = torch.ones(3, dtype=torch.float64)  # made outside, e.g. by a checkpoint
    with strict(torch.float32):
        moved = buffer.to("cpu")  # a device move carries float64: not the bug
        assert moved.dtype == torch.float64
        with pytest.raises(DtypePolicyError, match="torch.outer"):
            torch.outer(torch.ones(2), moved)


def test_numpy_crossings_both_ways():
    with pytest.raises(DtypePolicyError, match=r"torch\.as_tensor.*-> float64"):
        with strict(torch.float32):
            torch.as_tensor(np.zeros(3))
    with strict(torch.float32):
        assert torch.as_tensor(np.zeros(3, dtype=np.float32)).dtype == torch.float32
        assert np.asarray(torch.zeros(3)).dtype == np.float32
    with strict(torch.bfloat16):  # the boundary helper is a deliberate float32 site
        assert to_numpy_float32(torch.zeros(3, dtype=torch.bfloat16)).dtype == np.float32


def test_default_dtype_creation_is_an_error_in_bfloat16():
    with pytest.raises(DtypePolicyError, match=r"torch\.zeros .*created"), strict(torch.bfloat16):
        torch.zeros(3)


def test_parameters_checked_on_entry():
    model = tiny_model(torch.float32)
    model.model.norm.weight.data = model.model.norm.weight.data.double()
    with pytest.raises(DtypePolicyError, match=r"model\.norm\.weight.*float64"):
        with strict(torch.float32, model=model):
            pass
    assert no_mode_active()


def test_error_names_the_submodule_path():
    model = tiny_model(torch.float32)
    layer = model.model.layers["1"]
    layer.self_attn.q_norm.weight.data = layer.self_attn.q_norm.weight.data.double()
    # Not a parameter check (model=None names no paths); the op inside q_norm fails.
    with pytest.raises(DtypePolicyError) as info, strict(torch.float32):
        model(ids())
    assert "RMSNorm" in info.value.where
    model.model.layers["1"].self_attn.q_norm.weight.data = torch.ones(CFG.head_dim)
    bad = nn.Linear(CFG.hidden_size, CFG.hidden_size, bias=False).double()
    model.model.layers["1"].self_attn.o_proj = bad
    # Checked on entry, before the forward: without strict mode the same forward fails only
    # inside o_proj with torch's bare RuntimeError (a float32 input, a float64 weight).
    with pytest.raises(DtypePolicyError, match=r"layers\.1\.self_attn\.o_proj\.weight.*float64"):
        with strict(torch.float32, model=model):
            model(ids())
    with pytest.raises(RuntimeError) as bare:
        model(ids())
    assert not isinstance(bare.value, DtypePolicyError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        strict(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="dtype"):
        strict(torch.int64)
    with pytest.raises(TypeError, match="nn.Module"):
        strict(model=object())
    with pytest.raises(ValueError, match="float8"):
        parse_dtype(torch.float8_e4m3fn)  # floating to torch, but nothing computes in it


# -- zero cost outside the context --------------------------------------------------------


def test_nothing_installed_after_exit_or_on_error():
    model = tiny_model()
    before = dict(vars(model))
    with strict(torch.float32, model=model) as policy:
        assert policy.active and not no_mode_active()
        model(ids())
    assert not policy.active and no_mode_active()
    with pytest.raises(DtypePolicyError), strict(torch.float32, model=model):
        torch.ones(1).double()
    assert no_mode_active()
    assert "forward" not in vars(model) and vars(model).keys() == before.keys()
    assert type(model).forward is Qwen3OmniThinker.forward
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks
    # And outside, a policy break is not checked at all.
    assert (torch.ones(1) * torch.ones(1, dtype=torch.float64)).dtype == torch.float64


# -- the policy table points at real code ----------------------------------------------------


@pytest.mark.parametrize("site", sorted(DELIBERATE_SITES))
def test_every_deliberate_site_exists(site):
    """A renamed function would silently stop being a site: each name must resolve."""
    parts = site.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        assert callable(obj)
        assert DELIBERATE_SITES[site][0]  # every site says why
        return
    pytest.fail(f"{site} does not name a module")
