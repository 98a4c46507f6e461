"""Model loading, the architecture registry and each model's shape.

``ModelShape`` gives, for one model, the counts and widths of the units of the target
matrices (``targets.TARGETS``). The registry says, for each supported ``model_type``,
where the blocks live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import S2FTError
from .gguf_bases import PACKAGED_MODELS, gguf_folder, is_gguf_source
from .targets import TARGETS, Unit, structure_consumer, structure_matrices


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its blocks; all supported families share HF LLaMA's names."""

    model_type: str
    description: str
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    ffn_name: str = "mlp"


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "LLaMA 1/2/3 (MHA or GQA)"),
        Architecture("mistral", "Mistral (GQA, sliding window)"),
        Architecture("qwen2", "Qwen2 / Qwen2.5 (GQA, q/k/v biases)"),
        Architecture("qwen3", "Qwen3 (GQA, q/k norms, explicit head_dim)"),
    )
}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a supported model that S²FT's selection and layout need."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def unit_count(self, unit: Unit) -> int:
        """How many units of a kind a block has."""
        return {
            Unit.QUERY_HEAD: self.num_heads,
            Unit.KV_HEAD: self.num_kv_heads,
            Unit.CHANNEL: self.intermediate_size,
        }[unit]

    def num_units(self, matrix: str) -> int:
        """How many selectable units a target matrix has: query heads for q/o, key/value
        heads for k/v, intermediate channels for gate/up/down."""
        return self.unit_count(TARGETS[matrix].unit)

    def unit_width(self, matrix: str) -> int:
        """Rows (producers) or columns (consumers) of the matrix per unit."""
        return 1 if TARGETS[matrix].unit is Unit.CHANNEL else self.head_dim

    def layout_units(self, structure: str) -> tuple[int, int]:
        """The units a structure is co-permuted in, and their group size: the units of its
        consumer (query heads, channels), grouped as a key/value head groups query heads
        (1 for the FFN and for multi-head attention)."""
        members = structure_matrices(structure)
        grouped = any(TARGETS[m].unit is Unit.KV_HEAD for m in members)
        count = self.num_units(structure_consumer(structure))
        return count, self.group_size if grouped else 1

    def params_per_unit(self, matrix: str) -> int:
        """Weights of one unit's rows or columns (biases stay frozen)."""
        return self.unit_width(matrix) * self.hidden_size

    def matrix_shape(self, matrix: str) -> tuple[int, int]:
        """(out_features, in_features) of a target matrix."""
        inner = self.num_units(matrix) * self.unit_width(matrix)
        if TARGETS[matrix].consumer:
            return (self.hidden_size, inner)
        return (inner, self.hidden_size)


def supported_types() -> str:
    return ", ".join(f"{a.model_type} ({a.description})" for a in ARCHITECTURES.values())


def get_architecture(model_or_config) -> Architecture:
    """The registry entry for a model or config; refuses anything unsupported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise S2FTError(
            f"Model type {model_type!r} is not supported by s2ft. Supported model types: "
            f"{supported_types()}. S²FT needs separate q/k/v/o and gate/up/down projections; "
            "use a checkpoint of one of these families."
        )
    return ARCHITECTURES[model_type]


def model_shape(model_or_config) -> ModelShape:
    """Read the dimensions from the config; ``head_dim`` is never assumed to be
    hidden / heads when the config states it (Qwen3)."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = get_architecture(config)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise S2FTError(
            f"The config has {num_heads} attention heads and {num_kv_heads} key/value heads; "
            "the number of heads must be a multiple of the number of key/value heads."
        )
    return ModelShape(
        model_type=arch.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of Transformer blocks."""
    node = model
    for name in get_architecture(model).layers_path.split("."):
        node = getattr(node, name)
    return node


def unit_index(units, width: int, device=None) -> torch.Tensor:
    """Row (producer) or column (consumer) ids of ``units``, each ``width`` wide, in order."""
    ids = torch.as_tensor(list(units), dtype=torch.long, device=device)
    return (ids[:, None] * width + torch.arange(width, device=device)).flatten()


def module_path(model: nn.Module, layer: int, matrix: str) -> str:
    """Full module path of a target matrix, e.g. ``model.layers.3.mlp.down_proj``."""
    arch = get_architecture(model)
    block = arch.attention_name if TARGETS[matrix].structure == "attention" else arch.ffn_name
    return f"{arch.layers_path}.{layer}.{block}.{matrix}"


def get_linear(model: nn.Module, layer: int, matrix: str) -> nn.Module:
    return model.get_submodule(module_path(model, layer, matrix))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of the model."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------------------
# Loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


PRESET_PREFIX = "preset:"


def _preset_configs() -> dict:
    from transformers import LlamaConfig

    return {
        # Two-layer GQA model: runs anywhere in seconds (quickstart, tests, demos). Its
        # larger initialisation gives the tied embeddings a logit range that fine-tuning
        # a few heads and channels can use (at 0.02 the logits cannot leave ~uniform).
        "tiny-llama": LlamaConfig(
            initializer_range=0.2,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=512,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
        # The CPU benchmark shape of the efficiency issue.
        "bench-llama": LlamaConfig(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
        # The CUDA benchmark shapes: LLaMA-3.2-1B's dimensions, and LLaMA-2-7B's cut to
        # eight layers (two and four: the CPU benchmark at 7B layer width).
        "bench-llama3-1b": LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=4096,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
        **{
            f"bench-llama2-7b-{layers}l": LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=layers,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
                max_position_embeddings=4096,
            )
            for layers in (8, 2, 4)
        },
    }


def preset_names() -> list[str]:
    return [PRESET_PREFIX + name for name in _preset_configs()]


def _model_source(name_or_path: str) -> str:
    """A local directory (checked to exist) or a hub id, as transformers takes it; a
    packaged model or a ``.gguf`` file becomes its converted folder (:mod:`.gguf_bases`)."""
    if is_gguf_source(name_or_path):
        return str(gguf_folder(name_or_path))
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise S2FTError(
            f"Model directory {name_or_path!r} does not exist. Give model.name_or_path as a "
            "local Hugging Face model directory, a .gguf file, a hub id (e.g. "
            f"meta-llama/Llama-3.2-1B), a packaged model ({', '.join(PACKAGED_MODELS)}) or "
            f"one of the presets {', '.join(preset_names())}."
        )
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
    weights: bool = True,
) -> nn.Module:
    """Load a causal LM from a hub id, a local directory, a ``.gguf`` file or packaged
    model (dequantized, :mod:`.gguf_bases`), or a built-in preset (``preset:tiny-llama``:
    randomly initialised with ``seed``, no download).

    ``weights=False`` builds the architecture on the meta device from the config alone,
    for work that needs only shapes (random selection of an 8B model reads no weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise S2FTError(f"model.dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if name_or_path.startswith(PRESET_PREFIX):
        configs = _preset_configs()
        name = name_or_path[len(PRESET_PREFIX) :]
        if name not in configs:
            raise S2FTError(
                f"Unknown preset {name_or_path!r}. Built-in presets: {', '.join(preset_names())}."
            )
        if not weights:
            return _meta_model(configs[name], dtype)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(configs[name], dtype=DTYPES[dtype])
        model.config.name_or_path = name_or_path
        return model
    source = _model_source(name_or_path)
    try:
        if not weights:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            get_architecture(config)
            return _meta_model(config, dtype)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise S2FTError(
            f"Could not load model {name_or_path!r}: {str(err).rstrip('.')}. Check the path or "
            "hub id; a hub id needs network access (or a local copy in the Hugging Face cache)."
        ) from err
    get_architecture(model)
    if is_gguf_source(name_or_path):  # adapters name the base as the user did, not the cache
        model.config.name_or_path = name_or_path
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations during the backward pass (non-reentrant
    checkpointing). transformers also makes the input embeddings require grad, which only
    reentrant checkpointing needs; with S²FT's frozen embeddings it would send the backward
    pass through the layers below the lowest trainable one, so that hook is removed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def _meta_model(config, dtype: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    get_architecture(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])


def char_tokenizer():
    """A character-level tokenizer for the presets: no download, covers printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model (presets use :func:`char_tokenizer`); a pad token is set
    to EOS when the tokenizer has none."""
    from transformers import AutoTokenizer

    if name_or_path.startswith(PRESET_PREFIX):
        return char_tokenizer()
    source = _model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise S2FTError(
            f"Could not load the tokenizer of {name_or_path!r}: {str(err).rstrip('.')}. The "
            "model directory or hub repo needs its tokenizer files."
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
