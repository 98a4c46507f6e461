"""Asking the model: batched generation, and likelihoods of candidate answers.

Generation (paper §4: generate, then extract the answer) left-pads a batch of prompts and
decodes with the KV cache (``model.generate``): greedy by default (the fast default; the
official scripts use 4 beams), beam search or sampling when asked, each sequence ending
at EOS. Prompts are sorted by length so a batch holds similar lengths.

Likelihood scoring (``loglik``) reads, for every label a question offers, the model's
log-probability of the answer sentence ``the correct answer is <label>`` followed by EOS,
tokenised exactly as in training; the most likely label is the answer. A question's
choices share their tokens up to the label: the decoder reads that prefix once, and each
choice's own few tokens continue from its cache (for the architectures s2ft knows; others
read every choice whole). Both give the same log-likelihoods (``tests/test_eval.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data import IGNORE_INDEX, Example, alpaca_prompt, build_examples, collate, user_message
from ..engine.losses import example_losses, token_losses
from ..engine.models import ARCHITECTURES
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
    share_prefixes: bool = True,
) -> list[dict[str, float]]:
    """For every record, the log-likelihood of each offered label's answer sentence (and
    EOS) after the record's prompt: ``{label: log p}``. ``share_prefixes=False`` reads
    every choice whole (the reference the shared reading is checked and timed against)."""
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
    starts = [0]
    for labels in offered:
        starts.append(starts[-1] + len(labels))
    choices = [examples[starts[k] : starts[k + 1]] for k in range(len(records))]
    known = getattr(getattr(model, "config", None), "model_type", None) in ARCHITECTURES
    score = _shared_prefix_logliks if share_prefixes and known else _whole_sequence_logliks
    scores = score(model, choices, tokenizer.pad_token_id, batch_size, device, advance)
    return [dict(zip(labels, s, strict=True)) for labels, s in zip(offered, scores, strict=True)]


def _whole_sequence_logliks(
    model, choices: list[list[Example]], pad_id: int, batch_size: int, device, advance: Progress
) -> list[list[float]]:
    """Each choice's log-likelihood from its whole sequence, ``batch_size`` sequences a
    forward (sorted by length): the straightforward computation."""
    flat = [e for group in choices for e in group]
    # each sequence is 1/k of its record's progress, k the number of labels it offers
    share = [1 / len(group) for group in choices for _ in group]
    scores = [0.0] * len(flat)
    for chunk in _batches([len(e.input_ids) for e in flat], batch_size):
        batch = collate([flat[i] for i in chunk], pad_id)
        losses, _ = example_losses(model, {k: v.to(device) for k, v in batch.items()})
        for i, loss in zip(chunk, losses.tolist(), strict=True):
            scores[i] = -loss
        advance(sum(share[i] for i in chunk))
    out, at = [], 0
    for group in choices:
        out.append(scores[at : at + len(group)])
        at += len(group)
    return out


def _common_length(rows: list[list[int]], limit: int) -> int:
    """How many tokens all ``rows`` begin with, at most ``limit``."""
    first = rows[0]
    for i in range(limit):
        if any(row[i] != first[i] for row in rows):
            return i
    return limit


def _question_prefix(group: list[Example]) -> int:
    """Tokens every choice of a question begins with (the prompt, and the answer sentence
    up to the label), leaving each choice at least one token of its own."""
    rows = [list(zip(e.input_ids, e.labels, strict=True)) for e in group]
    return _common_length(rows, min(len(row) for row in rows) - 1)


class _Targets:
    """Target tokens of a batch, each with the hidden state that predicts it (a tensor's
    row and position) and whose log-likelihood it adds to: a question's (every choice's)
    or one choice's."""

    def __init__(self):
        self.rows: dict[int, list] = {}  # per hidden tensor: (row, position, token, owner)

    def add(self, hidden: int, row: int, position: int, token: int, owner: tuple) -> None:
        self.rows.setdefault(hidden, []).append((row, position, token, owner))

    def sums(self, hiddens: list[torch.Tensor], head) -> dict[tuple, float]:
        """The summed cross-entropy of each owner's targets, through the output head."""
        total: dict[tuple, float] = {}
        for k, rows in self.rows.items():
            hidden = hiddens[k]
            index = torch.tensor([(r, p) for r, p, _, _ in rows], device=hidden.device)
            tokens = torch.tensor([tok for _, _, tok, _ in rows], device=hidden.device)
            losses = token_losses(hidden[index[:, 0], index[:, 1]], head, tokens).tolist()
            for (_, _, _, owner), loss in zip(rows, losses, strict=True):
                total[owner] = total.get(owner, 0.0) + loss
        return total


def _shared_prefix_logliks(
    model, choices: list[list[Example]], pad_id: int, batch_size: int, device, advance: Progress
) -> list[list[float]]:
    """Each choice's log-likelihood with what its tokens share read once. For a batch of
    questions the decoder reads, each continuing the cache of the one before: the part
    every question begins with (a chat template's system turn), once; each question's
    prefix (up to the label, left-padded); each choice's own tokens (right-padded). A
    target token's log-probability comes from the hidden state before it, wherever that
    was read; only target rows go through the head. Questions per batch: ``batch_size``
    choices' worth, so that the expanded cache holds as many rows as one batch of whole
    sequences does."""
    from transformers import DynamicCache

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cut = [_question_prefix(group) for group in choices]
    per_batch = max(1, batch_size // max(len(group) for group in choices))
    scores: list[list[float]] = [[] for _ in choices]

    def read(ids, mask, positions, cache) -> torch.Tensor:
        return decoder(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            cache=cache,
            use_cache=True,
        ).last_hidden_state

    for chunk in _batches(cut, per_batch):
        groups = [choices[q] for q in chunk]
        prefixes = [groups[j][0].input_ids[: cut[q]] for j, q in enumerate(chunk)]
        labels = [groups[j][0].labels for j in range(len(chunk))]
        common = _common_length(prefixes, min(cut[q] for q in chunk) - 1)
        cache, hiddens, targets = DynamicCache(), [], _Targets()
        seen = torch.ones((len(chunk), common), dtype=torch.long)  # the mask read so far
        # 1. the batch's common part, one row: hidden t predicts token t + 1
        if common:
            ids = torch.tensor([prefixes[0][:common]])
            hiddens.append(read(ids, torch.ones_like(ids), torch.arange(common)[None], cache))
            cache.reorder_cache(torch.zeros(len(chunk), dtype=torch.long, device=device))
            for j in range(len(chunk)):
                for t in range(common):
                    if labels[j][t + 1] != IGNORE_INDEX:
                        targets.add(0, 0, t, labels[j][t + 1], (j,))
        # 2. each question's prefix after it, left-padded: its last token in the last column
        ids, mask = _left_pad([prefix[common:] for prefix in prefixes], pad_id)
        width = ids.shape[1]
        positions = common + (mask.cumsum(1) - 1).clamp(min=0)
        seen = torch.cat([seen, mask], 1)
        hiddens.append(read(ids, seen, positions, cache))
        for j, q in enumerate(chunk):
            for t in range(common, cut[q] - 1):
                if labels[j][t + 1] != IGNORE_INDEX:
                    targets.add(len(hiddens) - 1, j, width - cut[q] + t, labels[j][t + 1], (j,))
        # 3. every choice's own tokens, from its question's cache, right-padded
        own = [(j, e) for j, group in enumerate(groups) for e in group]
        tails = [e.input_ids[cut[chunk[j]] :] for j, e in own]
        tail_ids = torch.full((len(own), max(map(len, tails))), pad_id, dtype=torch.long)
        tail_mask = torch.zeros_like(tail_ids)
        for r, tail in enumerate(tails):
            tail_ids[r, : len(tail)] = torch.tensor(tail)
            tail_mask[r, : len(tail)] = 1
        question = torch.tensor([j for j, _ in own])
        cache.reorder_cache(question.to(device))
        starts = torch.tensor([cut[q] for q in chunk])[question]
        positions = starts[:, None] + torch.arange(tail_ids.shape[1])
        hiddens.append(read(tail_ids, torch.cat([seen[question], tail_mask], 1), positions, cache))
        prefix_read, tail_read = len(hiddens) - 2, len(hiddens) - 1
        for r, (j, e) in enumerate(own):
            start = cut[chunk[j]]  # > common: the question's prefix ends in its own part
            for t in range(start, len(e.input_ids)):  # the hidden state before token t
                if e.labels[t] == IGNORE_INDEX:
                    continue
                if t == start:  # the prefix's last token, in the last column
                    targets.add(prefix_read, j, width - 1, e.labels[t], (j, r))
                else:
                    targets.add(tail_read, r, t - start - 1, e.labels[t], (j, r))
        sums = targets.sums(hiddens, head)
        for r, (j, _) in enumerate(own):
            scores[chunk[j]].append(-(sums.get((j,), 0.0) + sums.get((j, r), 0.0)))
        advance(len(chunk))
    return scores


def best_label(logliks: dict[str, float]) -> str:
    """The most likely label (the first of equals)."""
    return max(logliks, key=logliks.__getitem__)


def answer_output(label: str) -> str:
    """The output recorded for a likelihood choice: its answer sentence."""
    return ANSWER_SENTENCE.format(label=label)
