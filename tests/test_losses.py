"""The memory-lean loss (losses.py) against the plain full-logits cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from s2ft_cli import S2FTConfig, get_s2ft_model, merge_adapter
from s2ft_cli.data import IGNORE_INDEX
from s2ft_cli.engine import losses as losses_module
from s2ft_cli.engine.losses import example_losses, token_losses
from s2ft_cli.engine.models import enable_activation_checkpointing
from s2ft_cli.engine.shapes import decoder_layers

from .conftest import tiny_model


def batch_of(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded example
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # a prompt
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way: full logits, shifted, cross-entropy summed per example."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    flat = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return flat.sum(1), (labels != IGNORE_INDEX).sum(1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of three rows, so that every batch is split into several."""
    monkeypatch.setattr(losses_module, "CHUNK_LOGITS", 97 * 3)
    monkeypatch.setattr(losses_module, "CHUNK_ROWS", 1)


def trained(name: str):
    """A tiny model converted, with deltas as training leaves them (non-zero)."""
    model = get_s2ft_model(tiny_model(name), S2FTConfig(targets={"o_proj": 0.5, "down_proj": 0.2}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen3"])
def test_losses_and_gradients_match_full_logits(name, small_chunks):
    model = trained(name)
    batch = batch_of(model.config.vocab_size)
    deltas = [p for p in model.parameters() if p.requires_grad]

    lean, counts = example_losses(model, batch)
    lean_grads = torch.autograd.grad(lean.sum(), deltas)
    plain, plain_counts = reference_losses(model, batch)
    plain_grads = torch.autograd.grad(plain.sum(), deltas)

    assert torch.equal(counts, plain_counts)
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the evaluation path takes no gradient
        torch.testing.assert_close(example_losses(model, batch)[0], plain.detach())


@pytest.mark.parametrize("head_trains", [False, True])
def test_token_losses_through_a_biased_head(head_trains, small_chunks):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97).requires_grad_(head_trains)
    hidden = torch.randn(10, 16, requires_grad=True)
    labels = torch.randint(0, 97, (10,))
    weights = torch.rand(10)  # a non-uniform upstream gradient
    (got,) = torch.autograd.grad((token_losses(hidden, head, labels) * weights).sum(), hidden)
    plain = F.cross_entropy(head(hidden), labels, reduction="none")
    (want,) = torch.autograd.grad((plain * weights).sum(), hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class ProducedShapes(TorchDispatchMode):
    """Records the shape of every tensor an operation produces, views of the model's
    weights (such as a transposed weight) aside."""

    def __init__(self, model):
        super().__init__()
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.weights:
                self.shapes.append(tuple(t.shape))
        return out

    def most_rows(self, width: int) -> int:
        """The most rows of ``width``-wide values any single tensor held."""
        return max((math.prod(s) // width for s in self.shapes if s and s[-1] == width), default=0)


def test_a_training_step_never_forms_the_full_logits(small_chunks):
    model = get_s2ft_model(tiny_model("llama-mha"), S2FTConfig(targets={"down_proj": 0.2}))
    batch = batch_of(model.config.vocab_size)
    vocab = model.config.vocab_size
    with ProducedShapes(model) as lean:
        example_losses(model, batch)[0].sum().backward()
    with ProducedShapes(model) as plain:
        reference_losses(model, batch)[0].sum().backward()
    assert plain.most_rows(vocab) >= batch["input_ids"].numel()  # the probe sees full logits
    assert lean.most_rows(vocab) == 3  # one chunk at a time


@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen3"])
@pytest.mark.parametrize("items", [None, 40])
def test_a_converted_model_called_with_labels_computes_the_lean_loss(name, items, small_chunks):
    """What Hugging Face's Trainer and most scripts call: ``model(**batch, labels=...)``.
    The loss and the deltas' gradients equal transformers' own forward and loss (with
    ``num_items_in_batch``, as the Trainer passes it, and without), and no full logits are
    formed; without gradients the model's own forward gives the logits."""
    model = trained(name)
    batch = batch_of(model.config.vocab_size)
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    deltas = [p for p in model.parameters() if p.requires_grad]
    with ProducedShapes(model) as step:
        out = model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            **extra,
        )
        lean_grads = torch.autograd.grad(out.loss, deltas)
    reference = type(model).forward(model, **batch, **extra)  # transformers' forward and loss
    plain_grads = torch.autograd.grad(reference.loss, deltas)
    assert out.logits is None and step.most_rows(model.config.vocab_size) == 3
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        evaluated = model(**batch, **extra)
    assert evaluated.logits is not None
    torch.testing.assert_close(evaluated.loss, reference.loss.detach(), rtol=1e-6, atol=1e-7)
    merge_adapter(model)  # a plain model again: its own forward
    assert "forward" not in model.__dict__ and model(**batch).logits is not None


@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen3"])
def test_ffns_recompute_their_activation_with_the_same_gradients(name):
    """A converted model's FFNs save the gate and up outputs only (ffn.py): the same loss
    and gradients bit for bit, one intermediate-wide tensor less saved per FFN the gradient
    flows through."""
    model = trained(name)
    batch = batch_of(model.config.vocab_size)
    deltas = [p for p in model.parameters() if p.requires_grad]

    def step():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = example_losses(model, batch)[0].sum()
        return loss, torch.autograd.grad(loss, deltas), saved

    loss, grads, saved = step()
    assert all("forward" in layer.mlp.__dict__ for layer in decoder_layers(model))
    for layer in decoder_layers(model):  # the FFNs' own forward again
        del layer.mlp.__dict__["forward"]
    plain_loss, plain_grads, plain_saved = step()
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))
    width = model.config.intermediate_size
    fused = [t for t in saved.values() if t.dim() == 3 and t.shape[-1] == width]
    plain = [t for t in plain_saved.values() if t.dim() == 3 and t.shape[-1] == width]
    assert fused and 3 * len(fused) == 2 * len(plain)  # gate and up outputs, not the activation


def test_a_training_step_never_forms_a_full_weight_gradient():
    """Partial back-propagation (§3.3): only block-sized weight gradients exist."""
    model = get_s2ft_model(
        tiny_model("llama-gqa-bias"),
        S2FTConfig(targets={"v_proj": 0.5, "o_proj": 0.25, "up_proj": 0.2, "down_proj": 0.1}),
    )
    with ProducedShapes(model) as step:
        example_losses(model, batch_of(model.config.vocab_size))[0].sum().backward()
    weights = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    deltas = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    assert deltas <= set(step.shapes)  # the probe sees the block gradients
    assert not weights & set(step.shapes)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_backward_below_the_lowest_trainable_layer(checkpointing):
    """Layers under the first trained one record no graph: nothing saved for the backward
    pass, which does not reach them."""
    model = get_s2ft_model(
        tiny_model("llama-mha"), S2FTConfig(targets={"o_proj": 0.5, "down_proj": 0.2}, layers=[1])
    )
    if checkpointing:
        enable_activation_checkpointing(model.train())
    layers = decoder_layers(model)
    current, saved = [None], {0: 0, 1: 0}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    backward_ran = []
    layers[0].register_full_backward_hook(lambda *a: backward_ran.append(0))

    def pack(t):  # a tensor of the graph (checkpointing also keeps each block's input)
        if current[0] is not None and t.requires_grad:
            saved[current[0]] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, _ = example_losses(model, batch_of(model.config.vocab_size))
    losses.sum().backward()
    assert saved[0] == 0
    assert saved[1] > 0 or checkpointing  # (the checkpoint's own hooks take layer 1's)
    assert not backward_ran
