"""The S²FT engine against references computed another way: the unconverted model's
logits and dense autograd gradients (paper §3)."""

from __future__ import annotations

import copy

import pytest
import torch

from s2ft_cli import (
    get_s2ft_model,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from s2ft_cli.adapter.format import read_adapter
from s2ft_cli.engine.layers import MAX_SPANS, S2Layer, S2Linear
from s2ft_cli.engine.shapes import Matrix

from .conftest import TINY_CONFIGS, batch, logit_tol, stories_model, tiny_model

# single targets and the paper's pairs (v+o, o+down, up+down), plus the other matrices
TARGETS = [
    {"o_proj": 0.3},
    {"down_proj": 0.1},
    {"q_proj": 0.3},
    {"k_proj": 0.5, "gate_proj": 0.1},
    {"v_proj": 0.5, "o_proj": 0.3},
    {"o_proj": 0.3, "down_proj": 0.1},
    {"up_proj": 0.1, "down_proj": 0.1},
    {"q_proj": 0.4, "o_proj": 0.4},
]


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def dense_grads(base, ids) -> dict[str, torch.Tensor]:
    """Gradients of every weight of the unconverted model, by plain autograd, by adapter
    name (a module's path for its ``weight``, an experts tensor's own path)."""
    model = copy.deepcopy(base)
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    loss_of(model, ids).backward()
    return {name.removesuffix(".weight"): p.grad for name, p in model.named_parameters()}


def adapted(tensor: torch.Tensor, tensors: dict, name: str):
    """``tensor`` (shaped like the stored weight ``name``) as a ``Matrix`` along the
    adapter's axis of ``name`` (experts stacked along it), that dim, and the adapter's
    rows or columns."""
    axis = "rows" if f"{name}.rows" in tensors else "cols"
    return Matrix(tensor, axis), 0 if axis == "rows" else 1, tensors[f"{name}.{axis}"]


def at(tensor: torch.Tensor, tensors: dict, name: str) -> torch.Tensor:
    """``tensor`` at the adapter's rows or columns of ``name`` (:func:`adapted`)."""
    matrix, dim, index = adapted(tensor, tensors, name)
    return matrix.select(dim, index)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sgd_step(model, ids, lr=1.0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    loss_of(model, ids).backward()
    opt.step()
    return params


def check_engine(base, targets, tmp_path, allocation="global", grad_tol=1e-5):
    ids = batch(base)
    with torch.no_grad():
        base_logits = base(ids).logits
    model = get_s2ft_model(
        copy.deepcopy(base), {"targets": targets, "seed": 3, "allocation": allocation}
    )
    model.eval()
    with torch.no_grad():  # conversion changes nothing
        diff = (model(ids).logits - base_logits).abs().max().item()
    assert diff <= logit_tol(base_logits), diff

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)
    params = sgd_step(model, ids)
    assert sum(p.numel() for p in params) == model.s2ft_selection.trainable_params()
    with torch.no_grad():
        trained_logits = model(ids).logits

    # each delta is minus the dense gradient at the same rows/columns
    save_adapter(model, tmp_path / "adapter")
    _, tensors, _ = read_adapter(tmp_path / "adapter")
    grads = dense_grads(base, ids)
    deltas = [k.removesuffix(".delta") for k in tensors if k.endswith(".delta")]
    assert deltas
    for name in deltas:
        delta = tensors[f"{name}.delta"]
        ref = -at(grads[name], tensors, name)
        assert rel_err(delta, ref) <= grad_tol, (name, rel_err(delta, ref))

    # a fresh base with the adapter unfused reproduces the trained logits
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        diff = (loaded(ids).logits - trained_logits).abs().max().item()
    assert diff <= logit_tol(trained_logits), diff

    # merging gives the same logits, a plain model, and touches only the adapter's slices
    for merged in (merge_adapter(loaded), merge_adapter(model)):
        assert not any(isinstance(m, S2Layer) for m in merged.modules())
        assert merged.state_dict().keys() == base.state_dict().keys()
        with torch.no_grad():
            diff = (merged(ids).logits - trained_logits).abs().max().item()
        assert diff <= logit_tol(trained_logits), diff
        expected = {k: v.clone() for k, v in base.state_dict().items()}
        for name in deltas:
            w = expected.get(f"{name}.weight", expected.get(name))
            matrix, dim, index = adapted(w, tensors, name)
            matrix.add_(dim, index, tensors[f"{name}.delta"])
        for k, v in merged.state_dict().items():
            assert torch.allclose(v, expected[k], rtol=0, atol=1e-7), k
        unmerge_adapter(merged)
        for k, v in merged.state_dict().items():
            assert (v - base.state_dict()[k]).abs().max().item() <= 1e-6, k


@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_engine_tiny(arch, targets, tmp_path):
    check_engine(tiny_model(arch), targets, tmp_path)


@pytest.mark.parametrize(
    "targets",
    [
        {"v_proj": 0.5, "o_proj": 0.2},
        {"o_proj": 0.2, "down_proj": 0.05},
        {"up_proj": 0.05, "down_proj": 0.05},
        {"q_proj": 0.3},
    ],
    ids=lambda t: "+".join(t),
)
def test_engine_stories260k(targets, tmp_path):
    check_engine(stories_model(), targets, tmp_path)


def test_per_layer_allocation(tmp_path):
    check_engine(
        tiny_model("llama-gqa-bias"),
        {"o_proj": 0.25, "up_proj": 0.1},
        tmp_path,
        allocation="per_layer",
    )


def delta_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_large_batch():
    base = tiny_model("llama-gqa-bias")
    cfg = {"targets": {"v_proj": 0.5, "o_proj": 0.3, "down_proj": 0.1}, "seed": 1}
    ids = batch(base, size=4)
    big = get_s2ft_model(copy.deepcopy(base), cfg)
    loss_of(big, ids).backward()
    small = get_s2ft_model(copy.deepcopy(base), cfg)
    for i in range(4):
        (loss_of(small, ids[i : i + 1]) / 4).backward()
    for (name, g_big), g_small in zip(
        delta_grads(big).items(), delta_grads(small).values(), strict=True
    ):
        assert rel_err(g_small, g_big) <= 1e-5, name


@pytest.mark.parametrize("arch", ["llama-gqa-bias", "qwen3"])
def test_gradient_checkpointing_same_gradients(arch):
    base = tiny_model(arch)
    cfg = {"targets": {"o_proj": 0.3, "up_proj": 0.1, "down_proj": 0.1}}
    ids = batch(base)
    plain = get_s2ft_model(copy.deepcopy(base), cfg).train()
    loss_of(plain, ids).backward()
    ckpt = get_s2ft_model(copy.deepcopy(base), cfg).train()
    ckpt.gradient_checkpointing_enable()  # the API users call (activation_checkpointing in v6)
    loss_of(ckpt, ids).backward()
    for (name, a), b in zip(delta_grads(plain).items(), delta_grads(ckpt).values(), strict=True):
        assert rel_err(b, a) <= 1e-6, name


def test_bfloat16_gradients_match_fp32_reference(tmp_path):
    base = tiny_model("llama-gqa-bias")
    ids = batch(base)
    cfg = {"targets": {"v_proj": 0.5, "o_proj": 0.3, "down_proj": 0.1}}
    model = get_s2ft_model(copy.deepcopy(base).to(torch.bfloat16), cfg)
    loss_of(model, ids).backward()
    save_adapter(model, tmp_path / "a")  # grads live in .grad; export the grads as deltas:
    for m in model.modules():
        if isinstance(m, S2Linear):
            assert m.delta.dtype == torch.float32 and m.delta.grad.dtype == torch.float32
            m.delta.data = -m.delta.grad
    save_adapter(model, tmp_path / "a")
    _, tensors, _ = read_adapter(tmp_path / "a")
    grads = dense_grads(base, ids)
    for key in [k for k in tensors if k.endswith(".delta")]:
        name = key.removesuffix(".delta")
        idx = tensors.get(f"{name}.rows")
        ref = -(grads[name][idx] if idx is not None else grads[name][:, tensors[f"{name}.cols"]])
        assert rel_err(tensors[key], ref) <= 0.05, name


def test_bf16_autocast_runs_in_bf16_and_gives_fp32_grads():
    base = tiny_model("mistral")
    model = get_s2ft_model(copy.deepcopy(base), {"targets": {"o_proj": 0.5, "down_proj": 0.2}})
    ids = batch(base)
    dtypes = []
    for m in model.modules():
        if isinstance(m, S2Linear):
            m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, ids)
    loss.backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    grads = dense_grads(base, ids)
    for name, m in model.named_modules():
        if isinstance(m, S2Linear):
            assert m.delta.grad.dtype == torch.float32
            ref = grads[name][:, m.original_index]
            # the permuted block equals the original columns in original_index order
            assert rel_err(m.delta.grad, ref) <= 0.05, name


def test_unfreezing_the_base_weight_is_refused():
    from s2ft_cli import S2FTError

    model = get_s2ft_model(tiny_model("mistral"), {"targets": {"o_proj": 0.5}})
    model.requires_grad_(True)
    with pytest.raises(S2FTError, match="only the deltas"):
        model(batch(model))


def forward_saving(layer, x):
    """The layer's output and the tensors its forward saves for backward, the layer's own
    parameters (the frozen product saves the weight, as the view Wᵀ) left out."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return y, [t for t in saved if t is not None and t.untyped_storage().data_ptr() not in weights]


def test_consumer_saves_only_its_input_slice():
    """A column block keeps x[..., s:e] alive, as its own tensor, and not x (paper §3.3)."""
    base = torch.nn.Linear(64, 32)
    layer = S2Linear(base, "cols", torch.arange(8, 16))
    x = torch.randn(3, 5, 64, requires_grad=True)
    y, activations = forward_saving(layer, x)
    assert [tuple(t.shape) for t in activations] == [(3, 5, 8)]
    assert activations[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert activations[0].untyped_storage().nbytes() == 3 * 5 * 8 * 4
    y.sum().backward()
    assert base.weight.grad is None and layer.delta.grad.shape == (32, 8)


@pytest.mark.parametrize("arch", ["llama-gqa-bias", "qwen3"])
def test_gradients_with_trained_deltas(arch):
    """With non-zero deltas (mid-training), delta gradients equal dense autograd on the
    model whose weights have the deltas fused in."""
    base = tiny_model(arch)
    ids = batch(base)
    model = get_s2ft_model(
        copy.deepcopy(base),
        {"targets": {"v_proj": 0.5, "o_proj": 0.5, "up_proj": 0.2, "down_proj": 0.2}},
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    loss_of(model, ids).backward()
    got = {
        name: (m.original_index, m.axis, m.delta.grad)
        for name, m in model.named_modules()
        if isinstance(m, S2Linear)
    }
    grads = dense_grads(merge_adapter(model), ids)
    for name, (index, axis, grad) in got.items():
        ref = grads[name][index] if axis == "rows" else grads[name][:, index]
        assert rel_err(grad, ref) <= 1e-5, name


def test_producer_saves_only_its_input():
    """A row block keeps x alive (dΔ = g[..., s:e]ᵀ x) and nothing else (paper §3.3)."""
    base = torch.nn.Linear(64, 32)
    layer = S2Linear(base, "rows", torch.arange(8, 16))
    x = torch.randn(3, 5, 64, requires_grad=True)
    y, activations = forward_saving(layer, x)
    storages = {t.untyped_storage().data_ptr() for t in activations}
    assert storages == {x.untyped_storage().data_ptr()}
    y.sum().backward()
    assert base.weight.grad is None and layer.delta.grad.shape == (8, 64)


class CountingLinear(torch.nn.Module):
    """A frozen linear map that is not an ``nn.Linear``: its own forward, counted."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / 8)
        self.bias = torch.nn.Parameter(torch.randn(out_features))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.matmul(x, self.weight.t()) + self.bias


SCATTERED = list(range(0, 2 * MAX_SPANS + 4, 2))  # more runs than MAX_SPANS


@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize(
    "index,runs",
    [([8, 9, 10, 11], 1), ([3, 17, 18, 5], 3), (SCATTERED, None)],
    ids=["block", "runs", "scattered"],
)
def test_an_s2_layer_wraps_any_frozen_linear_module(axis, index, runs):
    """The frozen product is the wrapped module's own forward; dΔ and dx equal dense
    autograd on the weight with the delta fused in, whether the delta is added run by run
    or gathered and scattered; the base gets no gradient."""
    torch.manual_seed(0)
    base = CountingLinear(24 + max(index), 20 + max(index))
    layer = S2Linear(base, axis, torch.tensor(index))
    with torch.no_grad():
        layer.delta.normal_(0, 0.1)
    assert (layer.spans and len(layer.spans)) == runs
    x = torch.randn(2, 7, base.weight.shape[1], requires_grad=True)
    y = layer(x)
    assert base.calls == 1
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None

    fused = base.weight.detach().clone()
    if axis == "rows":
        fused[index] += layer.delta.detach()
    else:
        fused[:, index] += layer.delta.detach()
    fused.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ fused.t() + base.bias.detach()
    (y_ref * g).sum().backward()
    assert rel_err(y.detach(), y_ref.detach()) <= 1e-6
    assert rel_err(x.grad, x_ref.grad) <= 1e-6
    ref = fused.grad[index] if axis == "rows" else fused.grad[:, index]
    assert rel_err(layer.delta.grad, ref) <= 1e-6

    # the state dict keeps the wrapped module's names; merging needs a dense nn.Linear
    assert list(layer.state_dict()) == ["weight", "bias", "delta"]
    copy_ = S2Linear(CountingLinear(*base.weight.shape[::-1]), axis, torch.tensor(index))
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_.weight, base.weight) and torch.equal(copy_.delta, layer.delta)
    from s2ft_cli import S2FTError

    with pytest.raises(S2FTError, match="Cannot merge an S²FT delta into a CountingLinear"):
        layer.merge()
    assert layer.unload() is base and base.weight.requires_grad


@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("shape", [(32, 32), (48, 32)], ids=["square", "tall"])
def test_autocast_keeps_no_cast_of_the_frozen_weight(axis, shape):
    """Under bf16 autocast an fp32 nn.Linear would save its weight cast to bf16 for the
    input's gradient; the S² layer casts it again in backward instead. Gradients match
    dense autograd on the fused weight under the same autocast."""
    torch.manual_seed(0)
    base = torch.nn.Linear(shape[1], shape[0])
    layer = S2Linear(base, axis, torch.arange(4, 12))
    with torch.no_grad():
        layer.delta.normal_(0, 0.1)
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, activations = forward_saving(layer, x)
    kept = (3, 5, shape[1]) if axis == "rows" else (3, 5, 8)
    assert [tuple(t.shape) for t in activations] == [kept]
    assert y.dtype == torch.bfloat16
    (y.float() ** 2).sum().backward()

    fused = base.weight.detach().clone()
    block = fused[4:12] if axis == "rows" else fused[:, 4:12]
    block += layer.delta.detach()
    fused.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = torch.nn.functional.linear(x_ref, fused, base.bias.detach())
    (y_ref.float() ** 2).sum().backward()
    ref = fused.grad[4:12] if axis == "rows" else fused.grad[:, 4:12]
    assert rel_err(x.grad, x_ref.grad) <= 0.02
    assert rel_err(layer.delta.grad, ref) <= 0.02
    assert base.weight.grad is None


def test_autocast_with_checkpointing_same_gradients():
    base = tiny_model("llama-gqa-bias")
    cfg = {"targets": {"o_proj": 0.3, "up_proj": 0.1, "down_proj": 0.1}}
    ids = batch(base)
    grads = []
    for checkpointing in (False, True):
        model = get_s2ft_model(copy.deepcopy(base), cfg).train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, ids)
        loss.backward()
        grads.append(delta_grads(model))
    for (name, a), b in zip(grads[0].items(), grads[1].values(), strict=True):
        assert rel_err(b, a) <= 1e-6, name
