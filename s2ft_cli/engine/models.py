"""Model loading: hub ids, local folders, GGUF files and packaged models, the built-in
presets; tokenizers; activation checkpointing. A loaded model must be of a family s2ft
knows (``families.FAMILIES``, refused otherwise by :func:`~.shapes.get_family`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import S2FTError
from .gguf_bases import PACKAGED_MODELS, gguf_folder, is_gguf_source
from .shapes import get_family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on, else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


PRESET_PREFIX = "preset:"
# width, attention and vocabulary of the CPU benchmark presets (bench-llama, bench-mixtral)
CPU_BENCH_ATTENTION = dict(
    hidden_size=768,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def _preset_configs() -> dict:
    from transformers import LlamaConfig, MixtralConfig

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
            **CPU_BENCH_ATTENTION, intermediate_size=2048, num_hidden_layers=12
        ),
        # The CPU benchmark shape of a mixture-of-experts model: bench-llama's attention and
        # width, each FFN eight experts of 1024 channels, two a token (Mixtral's routing).
        "bench-mixtral": MixtralConfig(
            **CPU_BENCH_ATTENTION,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_local_experts=8,
            num_experts_per_tok=2,
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
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise S2FTError(f"model.dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if not weights:
        return _meta_model(load_config(name_or_path, trust_remote_code), dtype)
    if name_or_path.startswith(PRESET_PREFIX):
        config = load_config(name_or_path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.config.name_or_path = name_or_path
        return model
    source = _model_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise _unreadable(name_or_path, err) from err
    get_family(model)
    if is_gguf_source(name_or_path):  # adapters name the base as the user did, not the cache
        model.config.name_or_path = name_or_path
    return model


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The config of a model (as :func:`load_model` finds it; a preset's), of a family s2ft
    knows: no weights are read."""
    from transformers import AutoConfig

    if name_or_path.startswith(PRESET_PREFIX):
        configs = _preset_configs()
        name = name_or_path[len(PRESET_PREFIX) :]
        if name not in configs:
            raise S2FTError(
                f"Unknown preset {name_or_path!r}. Built-in presets: {', '.join(preset_names())}."
            )
        return configs[name]
    try:
        config = AutoConfig.from_pretrained(
            _model_source(name_or_path), trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise _unreadable(name_or_path, err) from err
    get_family(config)
    return config


def _unreadable(name_or_path: str, err: OSError) -> S2FTError:
    return S2FTError(
        f"Could not load model {name_or_path!r}: {str(err).rstrip('.')}. Check the path or "
        "hub id; a hub id needs network access (or a local copy in the Hugging Face cache)."
    )


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

    get_family(config)
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
