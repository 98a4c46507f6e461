"""Asking the model: batched generation, and likelihoods of candidate answers.

Generation (paper §4: generate, then extract the answer) decodes a batch of prompts,
sorted by length so a batch holds similar lengths, with the KV cache; each sequence ends at
EOS, at ``max_new_tokens`` or, for a label task, once its answer is out. Greedy decoding
(the fast default; the official scripts use 4 beams) has its own loop for the
architectures s2ft knows: the part every prompt of a batch begins with (the chat
template's system turn, the task's instruction) is read once, and a finished sequence
leaves the batch so that a rambling one decodes alone. Beam search, sampling and other
architectures go through transformers' ``generate``, which is also the reference the own
loop is checked against (the same outputs, ``tests/test_eval.py``).

Likelihood scoring (``loglik``) reads, for every label a question offers, the model's
log-probability of the answer sentence ``the correct answer is <label>`` followed by EOS,
tokenised exactly as in training; the most likely label is the answer. A question's
choices share their tokens up to the label: the decoder reads that prefix once, and each
choice's own few tokens continue from its cache (for the architectures s2ft knows; others
read every choice whole). Both give the same log-likelihoods (``tests/test_eval.py``).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence

import torch

from ..data import IGNORE_INDEX, Example, alpaca_prompt, build_examples, collate, user_message
from ..engine.losses import example_losses, logit_transform, token_losses
from ..engine.shapes import known_family
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
    own_loop: bool = True,
) -> list[str]:
    """The decoded continuation of every prompt (token ids), in the order given.
    ``own_loop=False`` decodes greedily with transformers' ``generate`` too (the reference
    the own loop is checked and timed against)."""
    if not prompts:
        return []
    greedy = not settings.do_sample and settings.num_beams == 1
    known = known_family(model) is not None
    if own_loop and greedy and known:
        return _greedy(model, tokenizer, prompts, settings, task, device, advance)
    return _transformers_generate(model, tokenizer, prompts, settings, task, device, advance)


def _stops_at_answer(settings: EvalSection, task: Task) -> bool:
    return settings.stop_at_answer and task.kind == "label" and settings.num_beams == 1


def _transformers_generate(
    model, tokenizer, prompts, settings: EvalSection, task: Task, device, advance: Progress
) -> list[str]:
    """Left-padded batches through ``model.generate``: greedy, beams or sampling."""
    from transformers import StoppingCriteriaList

    stop_early = _stops_at_answer(settings, task)
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


def _read(decoder, ids, mask, positions, cache, device) -> torch.Tensor:
    """The decoder's last hidden states for ``ids`` at ``positions``, continuing (and
    extending) ``cache``; ``mask`` covers the cache's columns and the new ones."""
    return decoder(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        cache=cache,
        use_cache=True,
    ).last_hidden_state


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` widened to ``width`` along ``dim`` with zeros in front."""
    missing = width - x.shape[dim]
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim)


@functools.cache
def _roomy_layer():
    """The KV cache layer class with spare room after its tokens (``_RoomyLayer``), made
    once: transformers is imported on first use."""
    from transformers.cache_utils import DynamicLayer

    class _RoomyLayer(DynamicLayer):
        """A decoding step writes its keys and values into the room left after the
        layer's tokens, where transformers' ``DynamicLayer`` concatenates (a copy of the
        whole cache each step: a quarter of a step's time on SmolLM2 at 16 rows)."""

        ROOM = 64

        def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Hold exactly these keys and values, with room after them."""
            b, h, n, d = keys.shape
            self.buffers = [t.new_empty((b, h, n + self.ROOM, d)) for t in (keys, values)]
            for buffer, t in zip(self.buffers, (keys, values), strict=True):
                buffer[:, :, :n] = t
            self.device, self.is_initialized = keys.device, True
            self._show(n)

        def _show(self, length: int) -> None:
            self.length = length
            self.keys, self.values = (buffer[:, :, :length] for buffer in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if not self.is_initialized:
                self.hold(key_states, value_states)
            elif self.length + n > self.buffers[0].shape[2]:
                pairs = ((self.keys, key_states), (self.values, value_states))
                self.hold(*(torch.cat(pair, -2) for pair in pairs))
            else:
                for buffer, t in zip(self.buffers, (key_states, value_states), strict=True):
                    buffer[:, :, self.length : self.length + n] = t
                self._show(self.length + n)
            return self.keys, self.values

    return _RoomyLayer


class _Decoding:
    """The rows decoding together: each row's prompt, the KV cache of what they read
    (left-padded), its attention mask, the position of each row's last token read, and the
    token each row picked next."""

    def __init__(self, rows: list[int], cache, seen, position, tokens):
        self.rows, self.cache, self.seen = rows, cache, seen
        self.position, self.tokens = position, tokens

    def keep(self, kept: list[int]) -> None:
        """Only the rows ``kept``; the leading columns no row attends to leave too."""
        index = torch.tensor(kept)
        self.rows = [self.rows[k] for k in kept]
        self.position, self.tokens = self.position[index], self.tokens[index]
        seen = self.seen[index]
        first = int(seen.any(0).int().argmax())  # the first column a row attends to
        self.seen = seen[:, first:]
        for layer in self.cache.layers:
            rows = index.to(layer.keys.device)
            layer.hold(layer.keys[rows, :, first:], layer.values[rows, :, first:])

    def join(self, other: _Decoding) -> None:
        """Take ``other``'s rows in: the shorter history is left-padded and masked out."""
        width = max(self.seen.shape[1], other.seen.shape[1])
        self.rows = self.rows + other.rows
        self.position = torch.cat([self.position, other.position])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.seen = torch.cat([_pad_left(self.seen, width, 1), _pad_left(other.seen, width, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            keys, values = (
                torch.cat([_pad_left(getattr(layer, name), width, 2) for layer in (mine, theirs)])
                for name in ("keys", "values")
            )
            mine.hold(keys, values)


def _greedy(
    model, tokenizer, prompts, settings: EvalSection, task: Task, device, advance: Progress
) -> list[str]:
    """Greedy decoding with up to ``batch_size`` rows at a time. The part every prompt
    begins with is read once (one row, its cache copied to each row); the prompts, longest
    first, join the batch whenever a quarter of it is free, their rest read left-padded;
    then one token a step for the rows still decoding, a finished row leaving the batch.
    Each row's tokens are what ``model.generate`` picks: the argmax of the same logits,
    with the same stops."""
    from transformers import Cache, DynamicCache

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    eos = set(_eos_ids(model, tokenizer))
    stop_early = _stops_at_answer(settings, task)
    outputs: list[str] = [""] * len(prompts)
    new: list[list[int]] = [[] for _ in prompts]

    def read(ids, mask, positions, cache) -> torch.Tensor:
        """The token each row picks after its last column."""
        hidden = _read(decoder, ids, mask, positions, cache, device)
        return head(hidden[:, -1]).argmax(-1).cpu()

    def finished(tokens: list[int]) -> bool:
        if tokens[-1] in eos or len(tokens) == settings.max_new_tokens:
            return True
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return stop_early and task.extract(text) is not None

    common = _common_length(prompts, min(map(len, prompts)) - 1)
    prefix = DynamicCache()
    if common:
        ids = torch.tensor([prompts[0][:common]])
        read(ids, torch.ones_like(ids), torch.arange(common)[None], prefix)
    shared = [(layer.keys, layer.values) for layer in prefix.layers] if common else []

    layer = _roomy_layer()

    def start(rows: list[int]) -> _Decoding:
        """The rows' prompts read after the common part, left-padded."""
        n = len(rows)
        cache = Cache(layer_class_to_replicate=layer)
        for keys, values in shared:
            cache.layers.append(layer())
            cache.layers[-1].hold(keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1))
        ids, mask = _left_pad([prompts[i][common:] for i in rows], tokenizer.pad_token_id)
        positions = common + (mask.cumsum(1) - 1).clamp(min=0)
        seen = torch.cat([torch.ones((n, common), dtype=torch.long), mask], 1)
        return _Decoding(rows, cache, seen, positions[:, -1], read(ids, seen, positions, cache))

    waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    refill = max(1, settings.batch_size // 4)
    batch: _Decoding | None = None
    while waiting or batch is not None:
        free = settings.batch_size - (len(batch.rows) if batch else 0)
        if waiting and free >= (refill if batch else 1):
            joining = start([waiting.popleft() for _ in range(min(free, len(waiting)))])
            if batch is None:
                batch = joining
            else:
                batch.join(joining)
        going = []
        for k, (row, token) in enumerate(zip(batch.rows, batch.tokens.tolist(), strict=True)):
            new[row].append(token)
            if finished(new[row]):
                outputs[row] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
                advance(1)
            else:
                going.append(k)
        if not going:
            batch = None
            continue
        if len(going) < len(batch.rows):
            batch.keep(going)
        batch.seen = torch.cat([batch.seen, torch.ones((len(going), 1), dtype=torch.long)], 1)
        batch.position = batch.position + 1
        batch.tokens = read(batch.tokens[:, None], batch.seen, batch.position[:, None], batch.cache)
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
    known = known_family(model) is not None
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

    def sums(self, hiddens: list[torch.Tensor], head, transform) -> dict[tuple, float]:
        """The summed cross-entropy of each owner's targets, through the output head (and
        its family's logit ``transform``)."""
        total: dict[tuple, float] = {}
        for k, rows in self.rows.items():
            hidden = hiddens[k]
            index = torch.tensor([(r, p) for r, p, _, _ in rows], device=hidden.device)
            tokens = torch.tensor([tok for _, _, tok, _ in rows], device=hidden.device)
            rows_hidden = hidden[index[:, 0], index[:, 1]]
            losses = token_losses(rows_hidden, head, tokens, transform).tolist()
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
        return _read(decoder, ids, mask, positions, cache, device)

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
        sums = targets.sums(hiddens, head, logit_transform(model))
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
