"""Recipes: YAML files that describe a run, validated with pydantic.

A recipe reads top to bottom like the run it describes: ``model:``, ``data:``, ``s2ft:``,
``train:``, ``output_dir``. Unknown keys are refused with the nearest valid name and
``key=value`` overrides from the command line are applied before validation. Relative
paths in the file resolve against its folder; paths given as overrides against the
current folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from .engine.config import S2FTConfig
from .engine.gguf_bases import is_gguf_source
from .errors import S2FTError


class ModelSection(BaseModel):
    """``model:``: what to fine-tune."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        description="Hub id, local directory, .gguf file, a packaged model "
        "(smollm2-135m-instruct), or a built-in preset such as preset:tiny-llama."
    )
    gguf_file: str | None = Field(
        None,
        description="A .gguf file inside the local folder name_or_path: the same as giving "
        "the file's path as name_or_path (which it becomes when the recipe is read).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights' dtype when loaded."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="Store the frozen linear weights in 4-bit NormalFloat (nf4) or 8 bits "
        "(int8) with bitsandbytes; the deltas train in float32.",
    )
    trust_remote_code: bool = Field(False, description="Allow a checkpoint's own Python code.")

    @model_validator(mode="after")
    def _gguf_file_into_path(self) -> ModelSection:
        """One spelling downstream: ``name_or_path`` is the file's path."""
        if self.gguf_file is None:
            return self
        if not is_gguf_source(self.gguf_file):
            raise ValueError(f"gguf_file {self.gguf_file!r} must name a .gguf file")
        if is_gguf_source(self.name_or_path):
            raise ValueError(
                f"name_or_path {self.name_or_path!r} is a GGUF model already and gguf_file "
                f"{self.gguf_file!r} names another; give one of them (model.gguf_file=null)"
            )
        self.name_or_path = str(Path(self.name_or_path) / self.gguf_file)
        self.gguf_file = None
        return self


class DataSource(BaseModel):
    """One dataset: ``data.train`` or ``data.validation`` (a bare path is accepted too)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="JSON/JSONL/TXT file, a Hugging Face dataset (format hf), or "
        "builtin:arithmetic (generated word problems)."
    )
    format: Literal["llm-adapters", "alpaca", "chat", "text", "hf"] = "llm-adapters"
    split: str = Field(
        "train",
        description="Split of a Hugging Face dataset; of builtin:arithmetic, train or test "
        "(held-out problems).",
    )
    subset: str | None = Field(None, description="Configuration name of a hub dataset.")
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value):
        return {"path": value} if isinstance(value, str) else value


# data.train is one source or a list of them; the tags let validation report the errors of
# the form given only, and _describe leaves them out of the key it names
ONE_SOURCE, SOURCES = "one source", "sources"
TrainSources = Annotated[
    Annotated[DataSource, Tag(ONE_SOURCE)] | Annotated[list[DataSource], Tag(SOURCES)],
    Discriminator(lambda value: SOURCES if isinstance(value, list) else ONE_SOURCE),
]


class DataSection(BaseModel):
    """``data:``: what to train on and how it is turned into tokens."""

    model_config = ConfigDict(extra="forbid")

    train: TrainSources = Field(
        description="One source, or a list of sources whose records are used together (e.g. "
        "LLM-Adapters' separate commonsense training sets)."
    )
    validation: DataSource | None = None
    val_size: int = Field(0, ge=0, description="Carve this many validation records from train.")
    seed: int | None = Field(
        None,
        description="Seed of the validation split and of generated records (builtin data); "
        "null: train.seed. Set it to vary train.seed over the same training examples.",
    )
    prompt_template: Literal["alpaca", "chat"] = Field(
        "alpaca", description="alpaca: the paper's prompt; chat: the tokenizer's chat template."
    )
    max_seq_len: int = Field(2048, ge=8, description="Longer examples are truncated.")
    train_on_prompt: bool = Field(False, description="Also take the loss on prompt tokens.")
    packing: bool = Field(
        False,
        description="Train on rows of several whole examples up to max_seq_len tokens, each "
        "attending only to itself (positions restart per example): no padding; the loss and "
        "gradient of every example are those it has alone. Batch sizes count rows.",
    )

    @property
    def train_sources(self) -> list[DataSource]:
        return self.train if isinstance(self.train, list) else [self.train]

    @model_validator(mode="after")
    def _check_sources(self) -> DataSection:
        if not self.train_sources:
            raise ValueError("data.train needs at least one source")
        return self


# transformers' schedules (``SchedulerType``) that run on the warm-up and total steps
# alone; the others need a metric or further arguments a recipe does not give.
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class TrainSection(BaseModel):
    """``train:``: the optimisation."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, description="Passes over the training set (unless max_steps).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    group_by_length: bool = Field(
        False,
        description="Batches of examples of similar length (less padding): the epoch's seeded "
        "order is sorted by length 64 global batches at a time, and the batches shuffled.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Scheduler = Field(
        "linear",
        description="The learning-rate schedule after warm-up (transformers' schedules that "
        "need only the warm-up and total steps).",
    )
    warmup_steps: int = Field(100, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null: off.")
    eval_every: int = Field(
        80, ge=0, description="Validation loss every N steps (0: only at the end)."
    )
    save_every: int = Field(500, ge=0, description="Checkpoint every N steps (0: only at the end).")
    log_every: int = Field(10, ge=1, description="A metrics.jsonl line every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    seed: int = Field(0, description="Seed of data order and initialisation.")
    autocast: Literal["auto", "bf16", "no"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, none on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="Under torchrun: ddp (every process holds the whole model; auto) or fsdp "
        "(FSDP2: every layer's weights, frozen and trained, sharded over the processes).",
    )
    fsdp_offload: bool = Field(
        False, description="fsdp: keep the parameter shards in CPU memory between uses."
    )
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="Also log to these (tensorboard: event files in <output_dir>/tensorboard/).",
    )

    def sharded(self, processes: int) -> bool:
        """Whether a run on ``processes`` processes shards the model (FSDP)."""
        return self.distributed == "fsdp" and processes > 1

    @model_validator(mode="after")
    def _check_offload(self) -> TrainSection:
        if self.fsdp_offload and self.distributed != "fsdp":
            raise ValueError(
                "fsdp_offload keeps FSDP's shards in CPU memory, so it needs distributed: fsdp "
                "(train.distributed=fsdp)"
            )
        return self


class EvalSection(BaseModel):
    """``eval:``: how ``s2ft eval`` scores the model: generate and extract the answer as the
    paper's evaluation does, greedy by default (its official scripts use 4 beams)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(
        None,
        description="Task names and groups (commonsense, math); default: every task whose "
        "test file is in data_dir.",
    )
    data_dir: str | None = Field(
        None,
        description="Folder of LLM-Adapters test sets (<task>/test.json, or dataset/<task>/"
        "test.json), one JSON/JSONL test file, or builtin:arithmetic (generated problems "
        "held out from training: task arithmetic, limit of them, default 500).",
    )
    mode: Literal["generate", "loglik"] = Field(
        "generate",
        description="generate: decode and extract the answer (the paper); loglik: pick the "
        "label whose answer sentence is most likely (commonsense only).",
    )
    batch_size: int = Field(16, ge=1, description="Prompts decoded (or choices scored) together.")
    limit: int | None = Field(None, ge=1, description="Only the first N examples of each task.")
    max_new_tokens: int = Field(256, ge=1, description="Longest generated answer (paper: 256).")
    num_beams: int = Field(1, ge=1, description="1: greedy or sampling; more: beam search.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Sample among the k likeliest tokens (0: all).")
    seed: int = Field(0, description="Seed of sampling.")
    stop_at_answer: bool = Field(
        True,
        description="Commonsense, greedy or sampling: stop a sequence once its output holds a "
        "label word (the extracted answer cannot change after that).",
    )
    prompt_template: Literal["alpaca", "chat"] | None = Field(
        None, description="Default: the recipe's data.prompt_template, else alpaca."
    )
    adapters: list[str] | None = Field(
        None, description="Adapters to evaluate one after another; default: the run's adapter."
    )
    include_base: bool = Field(
        False,
        description="Also evaluate the base model itself (no adapter), first, as 'base'; "
        "without adapters the base alone is evaluated anyway.",
    )
    merge: bool = Field(False, description="Fuse each adapter into the weights while it is used.")
    force: bool = Field(
        False, description="Load adapters whose base weights' checksums differ (shapes must match)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Weights' dtype; default: model.dtype.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    out: str | None = Field(None, description="Results folder; default: <output_dir>/eval.")

    @model_validator(mode="after")
    def _sampling_or_beams(self) -> EvalSection:
        if self.do_sample and self.num_beams > 1:
            raise ValueError(
                "choose sampling (do_sample, --do-sample) or beam search (num_beams > 1, "
                "--num-beams), not both"
            )
        return self


class Recipe(BaseModel):
    """A whole recipe."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection
    data: DataSection | None = None
    s2ft: S2FTConfig
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output_dir: str | None = Field(None, description="Where a run writes its files.")

    @property
    def data_seed(self) -> int:
        """The seed the training and validation examples are drawn with (``data.seed``,
        else ``train.seed``)."""
        seed = self.data.seed if self.data is not None else None
        return self.train.seed if seed is None else seed

    @model_validator(mode="after")
    def _check_sharded_quantization(self) -> Recipe:
        if self.model.quantization == "int8" and self.train.distributed == "fsdp":
            raise ValueError(
                "model.quantization int8 with train.distributed fsdp is not supported "
                "(bitsandbytes' 8-bit weights keep their scales where FSDP cannot shard "
                "them); shard a 4-bit base (model.quantization=nf4), or train the int8 base "
                "under ddp (each process holds the whole quantized model)"
            )
        return self


def _fields_at(loc: tuple) -> list[str]:
    """Valid key names at a location of the recipe (for 'did you mean')."""
    node: Any = Recipe
    for part in loc:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            break
        node = field.annotation
        # unwrap Optional[Section]
        for arg in getattr(node, "__args__", ()):
            if hasattr(arg, "model_fields"):
                node = arg
    return list(getattr(node, "model_fields", {}))


def _describe(err: ValidationError, source: str, flags: bool = False) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if isinstance(p, str | int) and p not in (ONE_SOURCE, SOURCES)
        )
        key = ".".join(map(str, loc))
        if flags:  # command-line options: --max-new-tokens, not max_new_tokens
            key = "--" + str(loc[0]).replace("_", "-") if loc else ""
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {'.'.join(map(str, (*loc[:-1], near[0])))!r}?" if near else ""
            lines.append(f"unknown key {key!r}.{hint} Valid keys here: {', '.join(valid)}.")
        elif e["type"] == "missing":
            lines.append(f"missing key {key!r}.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            prefix = f"{key}: " if key else ""
            if isinstance(e.get("input"), dict):  # a check across the keys of a section
                lines.append(f"{prefix}{msg}.")
            else:
                lines.append(f"{prefix}{msg} (got {e.get('input')!r}).")
    return f"Invalid {source}: " + " ".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise S2FTError(
            f"Override {item!r} is not key=value; write e.g. s2ft.seed=1 or train.lr=1e-4."
        )
    return key.strip().split("."), yaml.safe_load(value)


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for depth, k in enumerate(keys[:-1]):
        if isinstance(node.get(k), list):
            where = ".".join(keys[: depth + 1])
            raise S2FTError(
                f"Override {'.'.join(keys)}: {where} is a list in this recipe; give it whole, "
                f"e.g. {where}='[{{path: a.json, limit: 100}}, {{path: b.json, limit: 100}}]'."
            )
        if not isinstance(node.setdefault(k, {}), dict):
            raise S2FTError(f"Override {'.'.join(keys)}: {k!r} is not a section of the recipe.")
        node = node[k]
    node[keys[-1]] = value


def _resolve(value: str, base: Path) -> str:
    """A relative path against the recipe's folder; hub ids and presets stay as they are."""
    if value.startswith(("./", "../")) or (base / value).exists():
        return str((base / value).resolve())
    return value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every mistake is an :class:`S2FTError`."""
    path = Path(path)
    if not path.is_file():
        raise S2FTError(
            f"Recipe {path} does not exist; give the path of a YAML recipe file "
            "(`s2ft recipes` lists the bundled ones, `s2ft init NAME DEST` copies one)."
        )
    try:
        with open(path) as f:  # a stream: YAML's messages then name the file and line
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        where = " ".join(str(err).split())
        raise S2FTError(
            f"Recipe {path} is not valid YAML ({where}). Fix it at the line named (brackets "
            "and quotes must close; indent with spaces, not tabs)."
        ) from err
    if not isinstance(data, dict):
        raise S2FTError(f"Recipe {path} must be a mapping of sections (model:, s2ft:, ...).")
    parsed = [_parse_override(item) for item in overrides or []]
    for keys, value in parsed:
        _apply_override(data, keys, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise S2FTError(_describe(err, f"recipe {path}")) from None

    given = {".".join(keys) for keys, _ in parsed}

    def base(key: str) -> Path:
        """Paths typed on the command line are relative to the current folder, the
        recipe's own to the recipe's folder."""
        on_command_line = key in given or key.rpartition(".")[0] in given
        return Path.cwd() if on_command_line else path.resolve().parent

    recipe.model.name_or_path = _resolve(recipe.model.name_or_path, base("model.name_or_path"))
    if recipe.data is not None:
        sources = [("train", s) for s in recipe.data.train_sources]
        for name, source in [*sources, ("validation", recipe.data.validation)]:
            if source is None or source.path.startswith("builtin:"):
                continue
            folder = base(f"data.{name}.path")
            if source.format == "hf":
                source.path = _resolve(source.path, folder)
            else:
                source.path = str((folder / source.path).resolve())
    ev = recipe.eval
    if ev.data_dir is not None and not ev.data_dir.startswith("builtin:"):
        ev.data_dir = str((base("eval.data_dir") / ev.data_dir).resolve())
    if ev.out is not None:
        ev.out = str((base("eval.out") / ev.out).resolve())
    if ev.adapters is not None:
        folder = base("eval.adapters")
        ev.adapters = [str((folder / a).resolve()) for a in ev.adapters]
    recipe.output_dir = str(
        (base("output_dir") / recipe.output_dir).resolve()
        if recipe.output_dir is not None
        else (Path.cwd() / "runs" / path.stem).resolve()
    )
    return recipe


def eval_settings(section: EvalSection | None, options: dict[str, Any]) -> EvalSection:
    """A recipe's ``eval:`` section (or the defaults) with the command line's options on
    top; options given as None are left as they are. Paths are made absolute."""
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    if given.get("adapters") is not None:
        given["adapters"] = [str(Path(a).resolve()) for a in given["adapters"]]
    for key in ("data_dir", "out"):
        if key in given and not (key == "data_dir" and given[key].startswith("builtin:")):
            given[key] = str(Path(given[key]).expanduser().resolve())
    try:
        return EvalSection.model_validate({**(section or EvalSection()).model_dump(), **given})
    except ValidationError as err:
        raise S2FTError(_describe(err, "s2ft eval options", flags=True)) from None


def run_directory(source: Path) -> tuple[Path, Path | None]:
    """The recipe of a source given to ``s2ft eval``: a recipe file (run folder from its
    output_dir), or a training run's directory (its saved recipe.yaml)."""
    if source.is_dir():
        if not (source / "recipe.yaml").is_file():
            raise S2FTError(
                f"{source} is not a training run's directory (it has no recipe.yaml). Give a "
                "run directory written by s2ft train, a recipe file, or --model/--adapter."
            )
        return source / "recipe.yaml", source.resolve()
    return source, None
