"""Selection strategies S²FT-W/A/S/G (paper §4): each strategy's scores and choice equal a
reference computed another way on the unconverted model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s2ft_cli import S2FTConfig, S2FTError
from s2ft_cli.data import Example, calibration_batches
from s2ft_cli.engine.losses import example_losses
from s2ft_cli.engine.selection import select_units
from s2ft_cli.engine.shapes import model_shape, unit_index

from .conftest import stories_model, tiny_model

# matrices whose units are columns, and those of the attention (stated here, not read from
# targets.TARGETS or the family table)
CONSUMERS = ("o_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def get_linear(model, layer: int, matrix: str):
    """A LLaMA-named model's projection, found by its names."""
    block = model.model.layers[layer]
    return getattr(block.self_attn if matrix in ATTENTION else block.mlp, matrix)


# every kind of unit: query heads as rows and columns, key/value heads, channels both ways
TARGET_SETS = [
    {"q_proj": 0.25, "v_proj": 0.5, "down_proj": 0.1},
    {"o_proj": 0.25, "k_proj": 0.5, "up_proj": 0.1},
]


def calibration(model, n=12, batch_size=4, seed=0):
    """Random token sequences of different lengths, the second half of each the target."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist()
        examples.append(Example(ids, [-100] * (length // 2) + ids[length // 2 :]))
    return calibration_batches(examples, n, batch_size, seed, pad_id=0)


def models():
    yield "llama-gqa-bias", tiny_model("llama-gqa-bias")
    yield "stories260K", stories_model()


def unit_rows(model, layer, matrix):
    """Each unit's slice of the weight, cut out one by one."""
    shape = model_shape(model)
    w = get_linear(model, layer, matrix).weight.detach().double()
    for u in range(shape.num_units(matrix)):
        ids = unit_index([u], shape.unit_width(matrix))
        yield w[:, ids] if matrix in CONSUMERS else w[ids]


def chosen(scores: dict[str, torch.Tensor], config: S2FTConfig) -> dict:
    """The global top-k (or bottom-k) of reference scores, as units per layer."""
    units: dict[int, dict[str, list[int]]] = {}
    for matrix, score in scores.items():
        count = int(config.targets[matrix] * score.numel())
        sign = -1 if config.order == "small" else 1
        for flat in torch.topk(sign * score.flatten(), count).indices.tolist():
            layer, unit = divmod(flat, score.shape[1])
            units.setdefault(layer, {}).setdefault(matrix, []).append(unit)
    return {i: {m: sorted(ids) for m, ids in pm.items()} for i, pm in sorted(units.items())}


def weight_reference(model, targets) -> dict[str, torch.Tensor]:
    layers = range(model.config.num_hidden_layers)
    return {
        m: torch.tensor(
            [[s.norm().item() for s in unit_rows(model, i, m)] for i in layers],
            dtype=torch.float64,
        )
        for m in targets
    }


def activation_reference(model, batches, targets) -> dict[str, torch.Tensor]:
    """Attention outputs rebuilt from eager attention probabilities and v_proj; FFN
    intermediate values rebuilt from the MLP input."""
    shape = model_shape(model)
    model.set_attn_implementation("eager")
    attn_in, mlp_in = {}, {}
    hooks = []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.self_attn.register_forward_pre_hook(
            lambda mod, args, kw, i=i: attn_in.__setitem__(i, kw["hidden_states"]),
            with_kwargs=True))  # fmt: skip
        hooks.append(block.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: mlp_in.__setitem__(i, args[0])))  # fmt: skip
    sums = {m: torch.zeros(shape.num_layers, shape.num_units(m), dtype=torch.float64)
            for m in targets}  # fmt: skip
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"].double()
            tokens += int(mask.sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_attentions=True)  # fmt: skip
            for i, block in enumerate(model.model.layers):
                b, t, _ = attn_in[i].shape
                v = block.self_attn.v_proj(attn_in[i]).view(b, t, shape.num_kv_heads, -1)
                heads = []
                for h in range(shape.num_heads):
                    probs = out.attentions[i][:, h]  # (b, t, t)
                    a = probs @ v[:, :, h // shape.group_size]  # the head's attention output
                    heads.append((a.double().abs().mean(-1) * mask).sum())
                heads = torch.stack(heads)
                mlp = block.mlp
                x = mlp_in[i]
                inner = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
                channels = (inner.double().abs() * mask[..., None]).sum((0, 1))
                for m in targets:
                    if m in ("q_proj", "o_proj"):
                        sums[m][i] += heads
                    elif m in ("k_proj", "v_proj"):
                        sums[m][i] += heads.view(shape.num_kv_heads, -1).mean(1)
                    else:
                        sums[m][i] += channels
    for h in hooks:
        h.remove()
    return {m: s / tokens for m, s in sums.items()}


def gradient_reference(model, batches, targets) -> dict[str, torch.Tensor]:
    """Dense autograd on the unconverted model: full weight gradients, then unit norms."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {(i, m): get_linear(model, i, m).weight for i in range(len(model.model.layers))
               for m in targets}  # fmt: skip
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for batch in batches:
        losses, _ = example_losses(model, batch)
        (losses.sum() / tokens).backward()
    shape = model_shape(model)
    scores = {}
    for m in targets:
        rows = []
        for i in range(shape.num_layers):
            g = weights[(i, m)].grad.double()
            n, width = shape.num_units(m), shape.unit_width(m)
            cut = [g[:, unit_index([u], width)] if m in CONSUMERS else g[unit_index([u], width)]
                   for u in range(n)]  # fmt: skip
            rows.append(torch.stack([c.norm() for c in cut]))
        scores[m] = torch.stack(rows)
    for w in weights.values():
        w.requires_grad_(False)
    return scores


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("order", ["large", "small"])
def test_each_strategy_equals_its_reference(order, targets):
    for name, model in models():
        batches = calibration(model)
        weight = weight_reference(model, targets)
        activation = activation_reference(model, batches, targets)
        references = {
            "weight": weight,
            "activation": activation,
            "weight_activation": {m: weight[m] * activation[m] for m in targets},
            "gradient": gradient_reference(model, batches, targets),
        }
        for strategy, reference in references.items():
            config = S2FTConfig(targets=targets, strategy=strategy, order=order)
            sel = select_units(model, config, batches)
            for m in targets:
                assert torch.allclose(sel.scores[m], reference[m], rtol=1e-4, atol=1e-9), (
                    name, strategy, m)  # fmt: skip
            assert sel.units == chosen(reference, config), (name, strategy)


def test_large_and_small_are_disjoint_and_choices_repeat():
    model = tiny_model("llama-mha")
    batches = calibration(model)
    for strategy in ("weight", "activation", "weight_activation", "gradient"):
        picks = {}
        for order in ("large", "small"):
            config = S2FTConfig(targets={"o_proj": 0.25, "down_proj": 0.1}, strategy=strategy,
                                order=order)  # fmt: skip
            picks[order] = select_units(model, config, batches).units
            assert select_units(model, config, calibration(model)).units == picks[order]
        for layer in range(2):
            for m in ("o_proj", "down_proj"):
                large = set(picks["large"].get(layer, {}).get(m, []))
                assert not large & set(picks["small"].get(layer, {}).get(m, [])), strategy


def test_data_strategies_need_calibration():
    with pytest.raises(S2FTError, match="measures the model on calibration data"):
        select_units(tiny_model("qwen3"), S2FTConfig(targets={"o_proj": 0.5}, strategy="gradient"))
    sel = select_units(tiny_model("qwen3"), S2FTConfig(targets={"o_proj": 0.5}, strategy="weight"))
    assert sum(len(pm["o_proj"]) for pm in sel.units.values()) == 4


def test_select_reports_scores_and_plots_the_selection(tmp_path):
    import json

    import matplotlib.image
    from typer.testing import CliRunner

    from s2ft_cli.cli import app
    from s2ft_cli.recipe import load_recipe
    from s2ft_cli.training.trainer import train

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'model: {name_or_path: "preset:tiny-llama"}\n'
        'data: {train: {path: "builtin:arithmetic", limit: 48}, max_seq_len: 256}\n'
        "s2ft: {targets: {o_proj: 0.25, down_proj: 0.1}, strategy: gradient, order: small,\n"
        "       calibration: {samples: 16, batch_size: 8}}\n"
        "train: {max_steps: 2, batch_size: 8, warmup_steps: 0}\n"
        "output_dir: run\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "select",
            str(recipe),
            "--plot",
            str(tmp_path / "s.png"),
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "strategy gradient, order small" in text and "gradient scores" in text
    png = (tmp_path / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(tmp_path / "s.png")
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., 0].std() > 0.05  # a picture, not a blank page
    # training makes the same choice, records it in the run and in the adapter's config
    train(load_recipe(recipe))
    selected = json.loads((tmp_path / "s.json").read_text())["units"]
    assert json.loads((tmp_path / "run" / "selection.json").read_text())["units"] == selected
    config = json.loads((tmp_path / "run" / "adapter" / "s2ft_adapter.json").read_text())
    assert config["selection"] == selected
    assert (config["strategy"], config["order"]) == ("gradient", "small")
    assert config["calibration"] == {"samples": 16, "batch_size": 8}


def test_ties_never_put_a_unit_in_both_large_and_small():
    model = tiny_model("llama-mha")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.down_proj.weight.zero_()  # every channel scores 0
    picks = [
        select_units(model, S2FTConfig(targets={"down_proj": 0.25}, strategy="weight", order=o))
        for o in ("large", "small")
    ]
    for layer in range(2):
        large = set(picks[0].units.get(layer, {}).get("down_proj", []))
        assert not large & set(picks[1].units.get(layer, {}).get("down_proj", []))
    assert sum(len(pm["down_proj"]) for p in picks for pm in p.units.values()) == 2 * 40


def test_a_resumed_run_keeps_its_measured_selection(tmp_path, monkeypatch):
    import s2ft_cli.training.methods as methods
    import s2ft_cli.training.trainer as training
    from s2ft_cli.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'model: {name_or_path: "preset:tiny-llama"}\n'
        'data: {train: {path: "builtin:arithmetic", limit: 48}, max_seq_len: 256}\n'
        "s2ft: {targets: {down_proj: 0.1}, strategy: activation}\n"
        "train: {max_steps: 2, batch_size: 8, warmup_steps: 0, save_every: 1}\n"
        "output_dir: run\n"
    )
    training.train(load_recipe(recipe))
    chosen = (tmp_path / "run" / "selection.json").read_text()

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed run must not measure its selection again")

    monkeypatch.setattr(methods, "select_units", measure_again)
    training.train(load_recipe(recipe, ["train.max_steps=3"]), resume=True)
    assert (tmp_path / "run" / "selection.json").read_text() == chosen
