"""Every family of the table (``engine/families.py``) held to the engine's guarantees on a
tiny random model: the table matches the stored weights, conversion keeps the logits, one
step's update is dense autograd's gradient of the base at the selected rows/columns
(soft-capping, logit scaling, fused, transposed and expert weights included), the
adapter reloads and merges to the trained logits, and nothing else moves."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from s2ft_cli import S2FTConfig, S2FTError, get_s2ft_model, load_adapter
from s2ft_cli.adapter.combine import combine
from s2ft_cli.adapter.format import Adapter
from s2ft_cli.adapter.peft import save_peft
from s2ft_cli.adapter.runtime import fuse
from s2ft_cli.adapter.serving import adapters_per_sequence, serve_adapters, stop_serving
from s2ft_cli.engine.families import FAMILIES
from s2ft_cli.engine.losses import example_losses
from s2ft_cli.engine.selection import select_units
from s2ft_cli.engine.shapes import Matrix, matrix_of, model_shape, role_slots, stored_axis
from s2ft_cli.engine.targets import TARGETS

from .conftest import batch, logit_tol
from .families import FAMILY_CONFIGS, family_model, gate_role
from .test_engine import check_engine, dense_grads, loss_of, rel_err
from .test_serving import random_adapter


def test_every_family_has_a_tiny_model():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


def target_sets(model_type: str) -> list[dict[str, float]]:
    """Two recipes covering all seven roles (producers and consumers, both structures); a
    family without a gate trains up_proj instead."""
    return [
        {"v_proj": 0.5, "o_proj": 0.5, "up_proj": 0.2, "down_proj": 0.2},
        {"q_proj": 0.5, "k_proj": 0.5, gate_role(model_type): 0.25},
    ]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_slots_tile_every_stored_weight(model_type):
    """Each stored weight's rows (or columns) along its units' axis are covered exactly
    once by the units of the roles living in it, for every expert; the other axis is the
    hidden size."""
    model = family_model(model_type)
    shape = model_shape(model)
    covered: dict[tuple, list[int]] = {}
    for layer in range(shape.num_layers):
        for role in FAMILIES[model_type].roles:
            slots = role_slots(shape, layer, role)
            assert sum(s.count for s in slots) == shape.num_units(role), role
            for slot in slots:
                matrix = matrix_of(model, slot.name)
                axis = stored_axis(slot.place, slot.axis)
                length = matrix.shape[0 if axis == "rows" else 1]
                per_expert = length // max(shape.num_experts, 1) if slot.expert is not None else 0
                shift = (slot.expert or 0) * per_expert
                ids = (slot.ids(range(slot.count)) + shift).tolist()
                covered.setdefault((slot.name, axis, length), []).extend(ids)
                other = matrix.shape[1 if axis == "rows" else 0]
                assert other % shape.hidden_size == 0, (slot.name, other)
    for (name, _, length), ids in covered.items():
        assert sorted(ids) == list(range(length)), name


# Both the S²FT step and the dense reference compute in fp32, in another order: on these
# tiny random models some slices' gradients cancel down to ~1e-5 of their terms (measured:
# StarCoder2's layer-1 q_proj, dense fp32 9.5e-6 from a float64 computation, S²FT 9.5e-6,
# 1.4e-5 from each other), so the comparison allows 3e-5.
GRAD_TOL = 3e-5


@pytest.mark.parametrize("set_index", [0, 1], ids=["attention-and-ffn", "producers"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_engine_guarantees(model_type, set_index, tmp_path):
    targets = target_sets(model_type)[set_index]
    check_engine(family_model(model_type), targets, tmp_path, grad_tol=GRAD_TOL)


@pytest.mark.parametrize("model_type", ["gemma2", "granite", "cohere"])
def test_the_lean_loss_is_the_models_own(model_type):
    """Soft-capping and logit scaling applied: the converted model's ``labels=`` loss and
    s2ft train's per-example losses equal transformers' loss of the base."""
    base = family_model(model_type)
    ids = batch(base)
    with torch.no_grad():
        reference = base(input_ids=ids, labels=ids).loss
    model = get_s2ft_model(copy.deepcopy(base), {"targets": {"o_proj": 0.5}})
    loss = loss_of(model, ids)  # grad mode: the lean path
    assert loss.grad_fn is not None and rel_err(loss.detach(), reference) <= 1e-6
    sums, counts = example_losses(model, {"input_ids": ids, "labels": ids})
    assert rel_err(sums.sum() / counts.sum(), reference) <= 1e-6


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt2", "qwen2_moe", "gpt_oss"])
def test_gradient_scores_are_unit_norms_of_the_dense_gradient(model_type):
    """S²FT-G reads each unit's slice of a fused, transposed or expert weight: its scores
    equal the norms of dense autograd's gradient cut unit by unit through the table."""
    model = family_model(model_type)
    ids = batch(model, size=2)
    labels = ids.clone()
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    roles = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    config = S2FTConfig(targets={r: 0.5 for r in roles[:2] + roles[3:]}, strategy="gradient")
    scores = select_units(model, config, calibration).scores
    config_o = S2FTConfig(targets={"o_proj": 0.5}, strategy="gradient")
    scores.update(select_units(model, config_o, calibration).scores)
    grads = dense_grads(model, ids)
    shape = model_shape(model)
    for role in roles:
        for layer in range(shape.num_layers):
            reference = []
            for slot in role_slots(shape, layer, role):
                grad = grads[slot.name]
                if slot.expert is not None:
                    grad = grad[slot.expert]
                grad = grad.t() if slot.place.transposed else grad
                ids_ = slot.ids(range(slot.count))
                cut = grad[:, ids_] if TARGETS[role].consumer else grad[ids_]
                axis = 1 if TARGETS[role].consumer else 0
                pieces = cut.double().split(slot.width, dim=axis)
                reference += [p.norm() for p in pieces]
            got = scores[role][layer]
            assert rel_err(got, torch.stack(reference)) <= 1e-4, (role, layer)


@pytest.mark.parametrize("strategy", ["weight", "activation"])
@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "qwen2_moe", "gpt_oss"])
def test_weight_and_activation_scores_on_fused_and_expert_weights(model_type, strategy):
    """Weight and activation scores have one value per unit of a fused, transposed or
    expert weight, non-negative and not all zero; a weight score is the norm of the
    unit's own slice (checked on layer 1's first down_proj slot). Activation values
    themselves: tests/test_strategies.py on LLaMA's layout."""
    model = family_model(model_type)
    ids = batch(model, size=2)
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    config = S2FTConfig(targets={"o_proj": 0.5, "down_proj": 0.5}, strategy=strategy)
    scores = select_units(model, config, calibration).scores
    shape = model_shape(model)
    for role in ("o_proj", "down_proj"):
        assert scores[role].shape == (shape.num_layers, shape.num_units(role))
        assert (scores[role] >= 0).all() and scores[role].sum() > 0
    if strategy == "weight":
        slot = role_slots(shape, 1, "down_proj")[0]
        weight = matrix_of(model, slot.name).tensor
        weight = weight[slot.expert] if slot.expert is not None else weight
        weight = weight.t() if slot.place.transposed else weight
        expected = weight.detach().double().norm(dim=0)[: slot.count]
        assert rel_err(scores["down_proj"][1][: slot.count], expected) <= 1e-9


def test_a_role_the_family_lacks_is_refused_naming_its_roles():
    model = family_model("gpt2")
    with pytest.raises(S2FTError, match="gate_proj.*gpt2.*Its roles: q_proj, k_proj, v_proj, "
                       "o_proj, up_proj, down_proj"):  # fmt: skip
        get_s2ft_model(model, {"targets": {"gate_proj": 0.5}})


def test_an_unknown_model_type_lists_the_families():
    config = OPTConfig(
        hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        vocab_size=50, word_embed_proj_dim=16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(S2FTError, match="'opt' is not supported.*llama.*gemma2.*phi3.*gpt_oss"):
        get_s2ft_model(model, {"targets": {"o_proj": 0.5}})


def test_mixed_dense_and_expert_layers_are_refused():
    from .families import family_config

    config = family_config("qwen2_moe")
    config.mlp_only_layers = [1]
    with pytest.raises(S2FTError, match="mixes dense and mixture-of-experts layers"):
        model_shape(config)


def test_experts_train_only_their_selected_slices():
    """No gradient of a 3-D experts tensor exists; each expert's delta covers only its
    own selected channels, and the router stays frozen."""
    base = family_model("mixtral")
    model = get_s2ft_model(copy.deepcopy(base), {"targets": {"up_proj": 0.3, "down_proj": 0.3}})
    loss_of(model, batch(model)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".delta") for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    experts = model.model.layers[0].mlp.experts
    for name, per_expert in experts.slices.items():
        for expert, (index, _, _) in per_expert.items():
            delta = experts.delta(name, expert)
            assert delta.shape[0 if name != "down_proj" else 1] == len(index)


def test_a_matrix_of_experts_stacks_them_along_the_unit_axis():
    base = family_model("mixtral")  # 4 experts, gate|up of 48 channels each, hidden 32
    gate_up = Matrix(base.model.layers[0].mlp.experts.gate_up_proj, "rows")
    assert gate_up.shape == (4 * 2 * 48, 32)


def random_adapters(model_type: str, targets: list[dict], folder):
    """A family's base, and an adapter of it per target set, with random non-zero deltas
    (every expert's too, whether a batch reaches it or not; seeds 1, 2, ...)."""
    base = family_model(model_type)
    paths = []
    for seed, chosen in enumerate(targets, 1):
        random_adapter(base, folder / f"adapter-{seed}", chosen, seed, scale=0.05)
        paths.append(folder / f"adapter-{seed}")
    return base, *paths


@pytest.mark.parametrize(
    "model_type", ["phi3", "gpt_neox", "gpt2", "mixtral", "qwen2_moe", "gpt_oss"]
)
def test_peft_computes_every_familys_adapter(model_type, tmp_path):
    """A PEFT export of a fused, transposed or experts weight (target_parameters) is the
    adapter: PEFT's logits are s2ft's, and s2ft reads the export back as the adapter."""
    from peft import PeftModel

    targets = target_sets(model_type)[0]
    base, path = random_adapters(model_type, [targets], tmp_path)
    adapter = Adapter.load(path)
    save_peft(adapter, tmp_path / "peft")
    ids = batch(base)
    with torch.no_grad():
        expected = load_adapter(copy.deepcopy(base), path)(ids).logits
        got = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()(ids).logits
    assert (got - expected).abs().max() <= logit_tol(expected)
    back = Adapter.load(tmp_path / "peft")
    assert back.updates.keys() == adapter.updates.keys()
    for name, u in adapter.updates.items():
        assert back.updates[name].axis == u.axis and torch.equal(back.updates[name].index, u.index)
        assert torch.equal(back.updates[name].delta, u.delta), name


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "mixtral", "qwen2_moe", "gpt_oss"])
def test_each_sequence_of_a_batch_gets_its_own_adapter(model_type, tmp_path):
    """Two adapters served on one base: every row of a batch gives the logits of its own
    adapter loaded alone (the base's for a row with none), and stopping gives the base
    its own modules back."""
    targets = target_sets(model_type)
    base, first, second = random_adapters(model_type, targets, tmp_path)
    ids = batch(base, size=3)
    expected = []
    for row, path in zip(ids, (first, None, second), strict=True):
        model = copy.deepcopy(base) if path is None else load_adapter(copy.deepcopy(base), path)
        with torch.no_grad():
            expected.append(model(row[None]).logits[0])
    served = serve_adapters(copy.deepcopy(base), {"a": first, "b": second})
    with torch.no_grad(), adapters_per_sequence(served, ["a", None, "b"]):
        got = served(ids).logits
    assert (got - torch.stack(expected)).abs().max() <= logit_tol(got)
    plain = stop_serving(served)
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]


def test_served_updates_follow_the_model_to_another_dtype(tmp_path):
    """``.to()`` after serve_adapters: a linear's and an expert's served updates move with
    the weights (as on a GPU, where an update left behind would be on the wrong device)."""
    from s2ft_cli.adapter.serving import MultiAdapterExperts, MultiAdapterLinear

    base, path = random_adapters("qwen2_moe", target_sets("qwen2_moe")[:1], tmp_path)
    served = serve_adapters(copy.deepcopy(base), {"a": path}).to(torch.float64)
    linear = [m for m in served.modules() if isinstance(m, MultiAdapterLinear)]
    experts = [m for m in served.modules() if isinstance(m, MultiAdapterExperts)]
    assert linear and experts
    deltas = [u.delta for m in linear for u in m.updates.values()]
    deltas += [u.delta for m in experts for per in m.updates.values() for u in per.values()]
    assert deltas and all(d.dtype == torch.float64 for d in deltas)


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt2", "qwen2_moe", "gpt_oss"])
def test_combining_adapters_of_a_family(model_type, tmp_path):
    """A combination is the sum of its adapters (its logits those of both fused in), and
    its overlap report counts units (heads, channels of an expert), fused weights' roles
    apart: an adapter combined with itself overlaps on every unit it has."""
    targets = target_sets(model_type)
    base, first, second = random_adapters(model_type, targets, tmp_path)
    a, b = Adapter.load(first), Adapter.load(second)
    combined, _ = combine([a, b])
    ids = batch(base)
    fused = copy.deepcopy(base)
    fuse(fused, a)
    fuse(fused, b)
    with torch.no_grad():
        expected = fused(ids).logits
        got = load_adapter(copy.deepcopy(base), combined)(ids).logits
    assert (got - expected).abs().max() <= logit_tol(expected)
    _, overlaps = combine([a, a])
    selection = a.config["selection"]
    for o in overlaps:
        assert o.units == o.overlapping > 0, o
    assert sum(o.units for o in overlaps) == sum(
        len(ids) for per_role in selection.values() for ids in per_role.values()
    )


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_shared_prefix_likelihoods_equal_whole_readings(model_type):
    """Answer likelihoods read with each question's shared part once (its cache continued
    by every choice) equal every choice read whole, through the family's logit transform."""
    from s2ft_cli.engine.models import char_tokenizer
    from s2ft_cli.evaluation import decoding
    from s2ft_cli.evaluation.tasks import TASKS

    model, tok = family_model(model_type), char_tokenizer()
    records = [{"instruction": f"Is {n} even? Answer true or false."} for n in (3, 14, 27)]
    args = (tok, records, TASKS["boolq"], "alpaca", 2, torch.device("cpu"))
    shared = decoding.answer_logliks(model, *args)
    whole = decoding.answer_logliks(model, *args, share_prefixes=False)
    for got, want in zip(shared, whole, strict=True):
        assert got.keys() == want.keys()
        for label in got:
            assert abs(got[label] - want[label]) <= 1e-4 * max(1.0, abs(want[label])), label
