"""Every user error of docs/ERRORS.md, through the CLI: exit 1, one message that names the
offending key, file, record or module and says how to fix it, no traceback."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2ft_cli.cli import app
from s2ft_cli.engine.models import char_tokenizer
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.trainer import train

from .conftest import SHARED, STORIES
from .test_train import RECIPE

ON_BOOLQ = ["--tasks", "boolq", "--data-dir", SHARED / "data" / "llm-adapters" / "dataset"]
ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"


@dataclass
class Workspace:
    root: Path
    recipe: Path  # a valid recipe whose run dir does not exist yet
    run: Path  # a finished run of the same recipe (adapter, checkpoints)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def adapter_copy(self, name: str) -> Path:
        """A copy of the trained adapter to damage."""
        return Path(shutil.copytree(self.run / "adapter", self.root / name))

    def run_copy(self, name: str) -> Path:
        """A copy of the finished run (recipe included) to damage."""
        return Path(shutil.copytree(self.run, self.root / name))


class Evil:
    """Pickled, it would run code when unpickled (``weights_only`` loading refuses it)."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('pwned')",))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("errors")
    text = RECIPE.replace("output_dir: run", f"output_dir: {root / 'fresh'}")
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    run = root / "run"
    train(load_recipe(recipe, [f"output_dir={run}", "train.max_steps=4", "train.eval_every=0"]))
    return Workspace(root, recipe, run)


def damaged_run(ws: Workspace, name: str, file: str, content: str | bytes) -> Path:
    """A copy of the finished run whose newest checkpoint's ``file`` holds ``content``."""
    run = ws.run_copy(name)
    (newest,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    (newest / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return run


def resume(run: Path) -> list:
    return ["train", run / "recipe.yaml", f"output_dir={run}", "--resume"]


def evil_checkpoint(ws: Workspace) -> list:
    return resume(damaged_run(ws, "evil-run", "trainer_state.pt", pickle.dumps({"x": Evil()})))


def damaged_checkpoint(ws: Workspace) -> list:
    return resume(damaged_run(ws, "damaged-run", "trainable.safetensors", b"\x00\x01not"))


def other_selection(ws: Workspace) -> list:
    return [*resume(ws.run_copy("reselected-run")), "s2ft.seed=7"]


def counting_tokenizer(ws: Workspace) -> Path:
    """A tokenizer folder whose chat template renders the number of messages first: a
    conversation's beginning alone is rendered unlike inside the whole conversation."""
    from .real_tokenizers import COUNTING_TEMPLATE

    tokenizer = char_tokenizer()
    tokenizer.chat_template = COUNTING_TEMPLATE
    tokenizer.save_pretrained(ws.root / "counting-tokenizer")
    return ws.root / "counting-tokenizer"


def adapter_with(ws: Workspace, name: str, change) -> Path:
    adapter = ws.adapter_copy(name)
    change(adapter)
    return adapter


def eval_adapter(adapter: Path) -> list[str]:
    return ["eval", "--model", "preset:tiny-llama", "--adapter", adapter, *ON_BOOLQ]


def set_config(key: str, value):
    def change(adapter: Path) -> None:
        config = json.loads((adapter / "s2ft_adapter.json").read_text())
        config[key] = value
        (adapter / "s2ft_adapter.json").write_text(json.dumps(config))

    return change


def edit_fingerprint(edit):
    def change(adapter: Path) -> None:
        config = json.loads((adapter / "s2ft_adapter.json").read_text())
        edit(config["base_model"]["fingerprint"])
        (adapter / "s2ft_adapter.json").write_text(json.dumps(config))

    return change


def write(name: str, content: str | bytes):
    def change(adapter: Path) -> None:
        (adapter / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return change


def config_dir(ws: Workspace, model_type: str, **settings) -> Path:
    """A model folder holding only a config (enough for s2ft select and s2ft plan)."""
    from .families import family_config

    config = family_config(model_type).to_dict()
    config.update(settings)
    return ws.file(f"{model_type}/config.json", json.dumps(config)).parent


def opt_dir(ws: Workspace) -> Path:
    """A model folder of a type s2ft does not know (OPT)."""
    return ws.file(
        "opt/config.json", json.dumps({"model_type": "opt", "num_hidden_layers": 2})
    ).parent


# id -> (what the user did, CLI arguments, substrings the message must hold: the offending
# thing and the fix)
CASES = {
    # recipe
    "recipe-missing": (
        lambda ws: ["train", ws.root / "nope.yaml"],
        ["nope.yaml", "does not exist", "s2ft init NAME DEST"],
    ),
    "recipe-yaml-syntax": (
        lambda ws: ["train", ws.file("bad.yaml", "model: {name_or_path: [unclosed\n")],
        ["bad.yaml", "not valid YAML", "line 2", "Fix it at the line named"],
    ),
    "recipe-python-tag": (
        lambda ws: [
            "train",
            ws.file("tagged.yaml", "model: !!python/object/apply:os.system ['touch PWNED']\n"),
        ],
        ["tagged.yaml", "not valid YAML", "python/object"],
    ),
    "recipe-not-a-mapping": (
        lambda ws: ["train", ws.file("list.yaml", "- model\n- data\n")],
        ["list.yaml", "mapping"],
    ),
    "recipe-unknown-key": (
        lambda ws: ["train", ws.recipe, "train.lrr=1e-3"],
        ["unknown key 'train.lrr'", "Did you mean 'train.lr'?"],
    ),
    "recipe-wrong-type": (
        lambda ws: ["train", ws.recipe, "train.batch_size=many"],
        ["train.batch_size", "valid integer"],
    ),
    "recipe-offload-without-fsdp": (
        lambda ws: ["train", ws.recipe, "train.fsdp_offload=true"],
        ["train: fsdp_offload", "train.distributed=fsdp"],
    ),
    "recipe-int8-fsdp": (
        lambda ws: ["train", ws.recipe, "model.quantization=int8", "train.distributed=fsdp"],
        ["model.quantization int8 with train.distributed fsdp", "model.quantization=nf4"],
    ),
    "plan-without-data": (
        lambda ws: [
            "plan",
            ws.file(
                "nodata.yaml",
                'model: {name_or_path: "preset:tiny-llama"}\ns2ft: {targets: {o_proj: 0.5}}\n',
            ),
        ],
        ["s2ft plan needs the recipe's data: section"],
    ),
    "recipe-override-syntax": (
        lambda ws: ["train", ws.recipe, "train.lr"],
        ["'train.lr'", "key=value"],
    ),
    "recipe-ratio-range": (
        lambda ws: ["train", ws.recipe, "s2ft.targets.o_proj=1.5"],
        ["s2ft.targets", "o_proj", "must be in (0, 1]"],
    ),
    "recipe-unknown-target": (
        lambda ws: ["train", ws.recipe, "s2ft.targets.attn_proj=0.1"],
        ["attn_proj", "o_proj", "down_proj"],
    ),
    "recipe-ratio-selects-nothing": (
        lambda ws: ["select", ws.recipe, "s2ft.targets={o_proj: 0.001}"],
        ["s2ft.targets.o_proj", "selects no unit", "Use at least"],
    ),
    "recipe-three-matrices": (
        lambda ws: ["select", ws.recipe, "s2ft.targets={q_proj: 0.2, v_proj: 0.2, o_proj: 0.2}"],
        ["s2ft.targets", "at most 2 trainable matrices per structure", "Keep two"],
    ),
    "recipe-layer-range": (
        lambda ws: ["select", ws.recipe, "s2ft.layers=[0, 5]"],
        ["s2ft.layers", "layer 5", "0..1", "leave s2ft.layers out"],
    ),
    "recipe-unknown-strategy": (
        lambda ws: ["select", ws.recipe, "s2ft.strategy=magic"],
        ["s2ft.strategy", "random", "gradient"],
    ),
    "recipe-negative-value": (
        lambda ws: ["train", ws.recipe, "train.lr=-1"],
        ["train.lr", "greater than"],
    ),
    "run-exists": (
        lambda ws: ["train", ws.recipe, f"output_dir={ws.run}"],
        ["already holds checkpoints", "--resume", "output_dir="],
    ),
    "resume-nothing": (
        lambda ws: ["train", ws.recipe, "--resume"],
        ["--resume", "no checkpoint", "start without --resume"],
    ),
    # data
    "data-builtin-split": (
        lambda ws: [
            "train",
            ws.recipe,
            "data.train.path=builtin:arithmetic",
            "data.train.split=dev",
        ],
        ["builtin:arithmetic", "'dev'", "data.*.split", "train or test"],
    ),
    "data-missing": (
        lambda ws: ["train", ws.recipe, f"data.train.path={ws.root / 'missing.json'}"],
        ["missing.json", "does not exist"],
    ),
    "data-bad-json": (
        lambda ws: ["train", ws.recipe, f"data.train.path={ws.file('bad.json', '[{')}"],
        ["bad.json", "not valid JSON", ".jsonl"],
    ),
    "data-bad-jsonl-line": (
        lambda ws: [
            "train",
            ws.recipe,
            f"data.train.path={ws.file('bad.jsonl', '{}' + chr(10) + '{oops' + chr(10))}",
        ],
        ["bad.jsonl", "line 2", "not valid JSON", "fix or remove that line"],
    ),
    "data-not-a-list": (
        lambda ws: ["train", ws.recipe, f"data.train.path={ws.file('dict.json', '{}')}"],
        ["dict.json", "list of records", "wrap the records"],
    ),
    "data-malformed-record": (
        lambda ws: [
            "train",
            ws.recipe,
            "data.val_size=0",
            "data.train.path="
            + str(
                ws.file(
                    "norecord.json",
                    json.dumps([{"instruction": "q", "output": "a"}] * 4 + [{"instruction": "q"}]),
                )
            ),
        ],
        ["norecord.json", "record 5", "'output'"],
    ),
    "data-too-small": (
        lambda ws: ["train", ws.recipe, "train.batch_size=4096"],
        ["fewer than one optimizer step", "train.batch_size"],
    ),
    "data-unknown-format": (
        lambda ws: ["train", ws.recipe, "data.train.format=parquet"],
        ["data.train.format", "alpaca"],
    ),
    "data-chat-without-template": (
        lambda ws: ["train", ws.recipe, "data.prompt_template=chat"],
        ["chat template", "alpaca"],
    ),
    "data-chat-template-rewrites": (
        lambda ws: [
            "data",
            ws.recipe,
            f"model.name_or_path={counting_tokenizer(ws)}",
            "data.prompt_template=chat",
            "data.val_size=0",
        ],  # fmt: skip
        ["record 1", "rewrites earlier turns", "Turns: 1", "one record per assistant turn"],
    ),
    # model
    "model-missing-dir": (
        lambda ws: ["train", ws.recipe, f"model.name_or_path={ws.root / 'no-model'}"],
        ["no-model", "does not exist", "hub id"],
    ),
    "model-unsupported": (
        lambda ws: ["select", ws.recipe, f"model.name_or_path={opt_dir(ws)}"],
        ["'opt'", "llama", "gemma2", "gpt_oss", "s2ft models"],
    ),
    "model-role-missing": (
        lambda ws: [
            "select",
            ws.recipe,
            f"model.name_or_path={config_dir(ws, 'gpt2')}",
            "s2ft.targets={gate_proj: 0.5}",
        ],
        ["gate_proj", "gpt2", "Its roles: q_proj, k_proj, v_proj, o_proj, up_proj, down_proj"],
    ),
    "model-mixed-experts": (
        lambda ws: [
            "select",
            ws.recipe,
            f"model.name_or_path={config_dir(ws, 'qwen2_moe', mlp_only_layers=[1])}",
        ],
        ["mixes dense and mixture-of-experts layers", "mlp_only_layers [1]"],
    ),
    "model-quantized-experts": (
        lambda ws: [
            "plan",
            ws.recipe,
            f"model.name_or_path={config_dir(ws, 'mixtral')}",
            "model.quantization=nf4",
        ],
        ["mixtral", "3-D tensors", "model.quantization: none"],
    ),
    "model-gguf-missing": (
        lambda ws: ["train", ws.recipe, f"model.name_or_path={ws.root / 'absent.gguf'}"],
        ["GGUF file", "absent.gguf", "does not exist", "smollm2-135m-instruct"],
    ),
    "model-gguf-unreadable": (
        lambda ws: ["select", ws.recipe, f"model.name_or_path={ws.file('junk.gguf', 'junk')}"],
        ["Could not read the GGUF file", "junk.gguf", "magic", "Hugging Face model folder"],
    ),
    "model-unknown-preset": (
        lambda ws: ["select", ws.recipe, "model.name_or_path=preset:huge"],
        ["preset:huge", "preset:tiny-llama"],
    ),
    "model-bad-dtype": (
        lambda ws: ["train", ws.recipe, "model.dtype=float8"],
        ["model.dtype", "float32", "bfloat16"],
    ),
    # adapter
    "adapter-missing": (
        lambda ws: eval_adapter(ws.root / "no-adapter"),
        ["no-adapter", "does not exist", "give an adapter directory"],
    ),
    "adapter-other-base": (
        lambda ws: [
            "eval",
            "--model",
            STORIES,
            "--adapter",
            ws.run / "adapter",
            *ON_BOOLQ,
        ],
        ["run/adapter", "different base model", "Load the adapter onto the base model"],
    ),
    "adapter-config-not-json": (
        lambda ws: eval_adapter(adapter_with(ws, "a-json", write("s2ft_adapter.json", "{x"))),
        ["a-json/s2ft_adapter.json", "not valid JSON", "re-export"],
    ),
    "adapter-wrong-format": (
        lambda ws: eval_adapter(adapter_with(ws, "a-format", set_config("format", "peft"))),
        ["s2ft_adapter.json", "s2ft-adapter", "version"],
    ),
    "adapter-foreign-peft": (
        lambda ws: eval_adapter(
            adapter_with(
                ws,
                "a-peft",
                lambda a: [
                    shutil.move(a / "s2ft_adapter.safetensors", a / "adapter_model.safetensors"),
                    (a / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}'),
                    (a / "s2ft_adapter.json").unlink(),
                ],
            )
        ),
        ["a-peft is a PEFT LORA adapter that s2ft did not write", "PeftModel.from_pretrained"],
    ),
    "adapter-pickle-weights": (
        lambda ws: eval_adapter(
            adapter_with(
                ws, "a-pickle", write("s2ft_adapter.safetensors", pickle.dumps({"x": Evil()}))
            )
        ),
        ["a-pickle/s2ft_adapter.safetensors", "not a readable safetensors file", "re-export"],
    ),
    "adapter-damaged-fingerprint": (
        lambda ws: eval_adapter(
            adapter_with(ws, "a-print", edit_fingerprint(lambda f: f.pop("matrices")))
        ),
        ["s2ft_adapter.json", "fingerprint", "re-export"],
    ),
    "export-rank-below-a-module": (
        lambda ws: ["export", ws.run, "--format", "peft", "--rank", "2", "--out", ws.root / "p2"],
        [
            "has rank",
            "above --rank 2",
            "the smallest --rank that holds every module is",
            "s2ft.max_units_per_layer",
            "s2ft.allocation",
        ],  # fmt: skip
    ),
    "adapter-out-exists": (
        lambda ws: ["export", ws.run, "--out", ws.run / "adapter"],
        ["already exists", "--out"],
    ),
    "combine-different-bases": (
        lambda ws: [
            "combine",
            ws.run / "adapter",
            adapter_with(
                ws, "a-other-base", edit_fingerprint(lambda f: f["shape"].update(hidden_size=96))
            ),
            "--out",
            ws.root / "combined",
        ],
        ["a-other-base", "different base models", "combine adapters of one base"],
    ),
    "export-no-run": (
        lambda ws: ["export", ws.root / "not-a-run", "--out", ws.root / "exported"],
        ["not-a-run", "recipe.yaml"],
    ),
    # checkpoint and selection
    "checkpoint-pickle": (
        evil_checkpoint,
        ["trainer_state.pt", "weights_only", "Do not resume"],
    ),
    "checkpoint-damaged": (
        damaged_checkpoint,
        ["trainable.safetensors", "damaged", "earlier checkpoint"],
    ),
    "export-checkpoint-pickle": (
        lambda ws: [
            "export",
            damaged_run(ws, "export-run", "trainable.safetensors", pickle.dumps([Evil()])),
            "--checkpoint",
            "4",
            "--out",
            ws.root / "exported-4",
        ],
        ["trainable.safetensors", "damaged", "earlier checkpoint"],
    ),
    "checkpoint-meta-damaged": (
        lambda ws: resume(damaged_run(ws, "meta-run", "meta.json", "{")),
        ["meta.json", "damaged", "earlier checkpoint"],
    ),
    "checkpoint-other-selection": (
        other_selection,
        ["another selection", "s2ft seed"],
    ),
    # eval
    "eval-unknown-task": (
        lambda ws: ["eval", "--model", "preset:tiny-llama", "--tasks", "boolqq"],
        ["boolqq", "boolq"],
    ),
    "train-unknown-eval-task": (
        lambda ws: ["train", ws.recipe, "eval.tasks=[boolqq]"],
        ["eval.tasks", "boolqq", "groups"],
    ),
    "eval-missing-test-set": (
        lambda ws: [
            "eval",
            "--model",
            "preset:tiny-llama",
            "--tasks",
            "boolq",
            "--data-dir",
            ws.root / "no-sets",
        ],
        ["no-sets", "does not exist", "give a folder or a test file"],
    ),
    "eval-task-not-in-folder": (
        lambda ws: [
            "eval",
            "--model",
            "preset:tiny-llama",
            "--tasks",
            "boolq",
            "--data-dir",
            ws.file("sets/piqa/test.json", "[]").parents[1],
        ],
        ["boolq", "test.json"],
    ),
    "eval-no-model": (
        lambda ws: ["eval", "--tasks", "boolq"],
        ["Which model?", "--model"],
    ),
    "eval-builtin-other-task": (
        lambda ws: [
            "eval",
            "--model",
            "preset:tiny-llama",
            "--data-dir",
            "builtin:arithmetic",
            "--tasks",
            "gsm8k",
        ],
        ["builtin:arithmetic", "task arithmetic only", "--tasks arithmetic"],
    ),
}


def docs_ids() -> list[str]:
    return re.findall(r"^\| `([a-z0-9-]+)` \|", ERRORS_DOC.read_text(), flags=re.M)


def test_every_documented_error_has_a_case_and_back():
    documented = docs_ids()
    assert len(documented) == len(set(documented)) >= 30
    assert sorted(documented) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error(case, ws, monkeypatch):
    monkeypatch.chdir(ws.root)
    make_args, expected = CASES[case]
    args = [str(a) for a in make_args(ws)]
    result = CliRunner().invoke(app, args)
    message = result.output.replace("\n", " ")
    assert result.exit_code == 1, f"{args} exited {result.exit_code}: {result.output}"
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "error: " in message
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    assert not (ws.root / "PWNED").exists()  # no pickle ran


def test_debug_shows_the_traceback(ws):
    result = CliRunner().invoke(app, ["--debug", "train", str(ws.recipe), "train.lrr=1"])
    assert result.exit_code != 0 and result.exception is not None
    assert not isinstance(result.exception, SystemExit)
