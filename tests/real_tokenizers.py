"""Real tokenizers for data tests: a byte-level BPE with LLaMA-3's split pattern (trained
here in a fraction of a second), the LLaMA-2 sentencepiece tokenizer and stories260K's,
and chat templates in the styles of LLaMA-3 and Qwen3 (which rewrites earlier turns)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from s2ft_cli.data import alpaca_prompt, arithmetic_problems

from .conftest import SHARED

LLAMA2_MODEL = SHARED / "models" / "llama2-tokenizer-32k" / "tokenizer.model"
# LLaMA-3's pre-tokenizer pattern: punctuation joins following newlines, newlines join.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Qwen3's rule: the reasoning (<think>...</think>) of assistant turns before the last user
# turn is dropped, later turns keep it; rendering a prefix of a conversation therefore
# differs from the same turns inside the whole one.
QWEN3_TEMPLATE = """\
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}\
{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content -%}{%- set reasoning = '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}
{%- else -%}{{- '<|im_start|>assistant\\n' + content }}{%- endif -%}
{{- '<|im_end|>\\n' }}
{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' }}{%- endif -%}"""
# Renders the number of messages before every turn: a prefix is never rendered as inside
# the whole conversation.
COUNTING_TEMPLATE = (
    "{{ 'Turns: ' + (messages | length | string) + '\n' }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_lines() -> list[str]:
    lines = []
    for r in arithmetic_problems(300, seed=5):
        lines.append(alpaca_prompt(r["instruction"]) + "\n" + r["output"])
        lines.append(r["output"] + ":\n\n" + r["answer"] + ".\n\n\n")
    return lines


def bpe_folder(folder: Path) -> Path:
    """Save the byte-level BPE tokenizer (tokenizer files only, no weights) in ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_lines(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=LLAMA3_SPECIALS[2:],
    )
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def llama2_folder(folder: Path) -> Path:
    """Save the LLaMA-2 sentencepiece model and a config naming its class in ``folder``."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} not present (it sits beside the repository)")
    if not folder.is_dir():
        folder.mkdir(parents=True)
        shutil.copy(LLAMA2_MODEL, folder / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def load(folder: Path):
    from s2ft_cli.engine.models import load_tokenizer

    return load_tokenizer(str(folder))
