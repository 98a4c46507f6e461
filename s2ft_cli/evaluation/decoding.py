"""Asking the model: batched generation, and likelihoods of candidate answers.

Generation (paper §4: generate, then extract the answer) left-pads a batch of prompts and
decodes with the KV cache (``model.generate``): greedy by default (the fast default; the
official scripts use 4 beams), beam search or sampling when asked, each sequence ending
at EOS. Prompts are sorted by length so a batch holds similar lengths.

Likelihood scoring (``loglik``) reads, for every label a question offers, the model's
log-probability of the answer sentence ``the correct answer is <label>`` followed by EOS,
tokenised exactly as in training; the most likely label is the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import alpaca_prompt, build_examples, collate, user_message
from ..engine.losses import example_losses
from ..recipe import EvalSection
from .tasks import ANSWER_SENTENCE, Task

Progress = Callable[[float], None]


def prompt_text(record: dict, tokenizer, template: str) -> str:
    """The prompt of a test record as in training: the Alpaca prompt, or the tokenizer's
    chat template with the question as the user turn."""
    instruction, extra = record["instruction"], record.get("input") or ""
    if template == "chat":
        message = {"role": "user", "content": user_message(instruction, extra)}
        return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    return alpaca_prompt(instruction, extra)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first (an out-of-memory shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


class _AnswerSeen:
    """Stops each sequence once its output holds one of the task's label words: the first
    label in the output is the prediction, and no later text can change it."""

    def __init__(self, task: Task, tokenizer, prompt_width: int):
        self.task, self.tokenizer, self.prompt_width = task, tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        done = [self.task.extract(t) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generation_config(model, tokenizer, settings: EvalSection):
    from transformers import GenerationConfig

    sampling = (
        {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        if settings.do_sample
        else {}
    )
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        num_beams=settings.num_beams,
        eos_token_id=_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    settings: EvalSection,
    task: Task,
    device: torch.device,
    advance: Progress = lambda n: None,
) -> list[str]:
    """The decoded continuation of every prompt (token ids), in the order given."""
    from transformers import StoppingCriteriaList

    if not prompts:
        return []
    stop_early = settings.stop_at_answer and task.kind == "label" and settings.num_beams == 1
    outputs: list[str] = [""] * len(prompts)
    torch.manual_seed(settings.seed)
    # The evaluation's settings replace the model's generation config for the duration:
    # generate() fills unset values (repetition_penalty, sampling, ...) from the model's.
    own, model.generation_config = (
        model.generation_config,
        _generation_config(model, tokenizer, settings),
    )
    try:
        for chunk in _batches([len(p) for p in prompts], settings.batch_size):
            ids, mask = _left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id)
            stops = [_AnswerSeen(task, tokenizer, ids.shape[1])] if stop_early else []
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                stopping_criteria=StoppingCriteriaList(stops),
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                outputs[i] = text.strip()
            advance(len(chunk))
    finally:
        model.generation_config = own
    return outputs


@torch.no_grad()
def answer_logliks(
    model,
    tokenizer,
    records: list[dict],
    task: Task,
    template: str,
    batch_size: int,
    device: torch.device,
    advance: Progress = lambda n: None,
) -> list[dict[str, float]]:
    """For every record, the log-likelihood of each offered label's answer sentence (and
    EOS) after the record's prompt: ``{label: log p}``."""
    if not records:
        return []
    offered = [task.candidates(r["instruction"]) for r in records]
    flat = [
        {
            "instruction": r["instruction"],
            "input": r.get("input") or "",
            "output": answer_output(label),
        }
        for r, labels in zip(records, offered, strict=True)
        for label in labels
    ]
    examples = build_examples(  # no length limit: every answer sentence is scored whole
        task.name, flat, "llm-adapters", tokenizer, template, 1 << 30, train_on_prompt=False
    )
    assert len(examples) == len(flat), "every answer sentence has target tokens"
    # each sequence is 1/k of its record's progress, k the number of labels it offers
    share = [1 / len(labels) for labels in offered for _ in labels]
    scores = [0.0] * len(examples)
    for chunk in _batches([len(e.input_ids) for e in examples], batch_size):
        batch = collate([examples[i] for i in chunk], tokenizer.pad_token_id)
        losses, _ = example_losses(model, {k: v.to(device) for k, v in batch.items()})
        for i, loss in zip(chunk, losses.tolist(), strict=True):
            scores[i] = -loss
        advance(sum(share[i] for i in chunk))
    starts = [0]
    for labels in offered:
        starts.append(starts[-1] + len(labels))
    return [
        dict(zip(labels, scores[starts[k] : starts[k + 1]], strict=True))
        for k, labels in enumerate(offered)
    ]


def best_label(logliks: dict[str, float]) -> str:
    """The most likely label (the first of equals)."""
    return max(logliks, key=logliks.__getitem__)


def answer_output(label: str) -> str:
    """The output recorded for a likelihood choice: its answer sentence."""
    return ANSWER_SENTENCE.format(label=label)
