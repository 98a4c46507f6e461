"""Tokenisation: the tokens a model trains on are the tokens it sees at inference.

* An instruction example is its prompt tokenised exactly as ``s2ft eval`` and generation
  feed it (with BOS when the tokenizer puts one in front of a text), then the response's
  tokens, then EOS. The response's tokens are those the tokenizer makes of the whole
  text when the prompt's own tokens are a prefix of them; where a BPE pre-tokenizer joins
  characters across the boundary (LLaMA-3's and Qwen's join punctuation with following
  newlines) they are the response tokenised on its own, without a word-boundary marker in
  front, so that decoding gives prompt + response with no character lost or added.
* A document is its text with BOS and EOS, every token a target.
* A conversation is rendered whole by the tokenizer's chat template and tokenised once;
  the targets are each assistant turn as the template renders it after the generation
  prompt, up to and including the special token that closes the turn (no role headers,
  no EOS after the template's own end of turn), as TRL's assistant-only loss trains. A
  template that renders the conversation before a turn differently from how generation
  is prompted (it rewrites earlier turns in a way the model would never see) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import S2FTError

IGNORE_INDEX = -100
BATCH = 1024  # texts per tokenizer call


@dataclass(frozen=True)
class Instruction:
    """An instruction record: the prompt inference feeds and the response to learn."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Document:
    """A plain text record, learned whole."""

    text: str


@dataclass
class Example:
    """One training sequence: token ids, labels (-100 where no loss is taken), and
    whether ``max_seq_len`` cut it; or several packed into one row (``data.packing``)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    position_ids: list[int] | None = None  # a packed row: positions restart at each example


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself puts one in front of a text, else None."""
    probe = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id if probe[:1] == [tokenizer.bos_token_id] else None


def _with_bos(ids: list[int], bos: int | None) -> list[int]:
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def encode(tokenizer, texts: list[str], offsets: bool = False) -> list:
    """Token ids of texts without added special tokens, in batches; with ``offsets`` each
    item is ``(ids, character spans)``."""
    out = []
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(
            texts[i : i + BATCH],
            add_special_tokens=False,
            verbose=False,
            return_offsets_mapping=offsets,
        )
        if offsets:
            pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            out += [(ids, [tuple(span) for span in spans]) for ids, spans in pairs]
        else:
            out += enc["input_ids"]
    return out


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts as generation is fed them: BOS (if the tokenizer uses one),
    then the prompt's tokens. Training puts exactly these in front of a response."""
    if not prompts:
        return []
    bos = bos_token_id(tokenizer)
    return [_with_bos(ids, bos) for ids in encode(tokenizer, list(prompts))]


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _response_alone(tokenizer, prompt: list[int], whole: list[int], response: str) -> list | None:
    """The response's tokens after ``prompt`` when the tokenizer merges across the
    boundary: the response tokenised alone, or after a special token (which stops a
    sentencepiece tokenizer from putting a word-boundary marker in front); the first whose
    decoding after the prompt equals the whole text's. None if neither does."""
    want = _decode(tokenizer, whole)
    candidates = [encode(tokenizer, [response])[0]]
    sentinel = tokenizer.eos_token
    if sentinel is not None:
        ids = encode(tokenizer, [sentinel + response])[0]
        if ids[:1] == [tokenizer.eos_token_id]:
            candidates.append(ids[1:])
    for ids in candidates:
        if _decode(tokenizer, prompt + ids) == want:
            return ids
    return None


def _finish(
    fed: list[int], targets: list[int], bos: int | None, eos: int | None, max_seq_len: int
) -> Example:
    """BOS (never a target) in front, EOS (a target) behind, cut to ``max_seq_len``."""
    ids = _with_bos(fed, bos)
    labels = [IGNORE_INDEX] * (len(ids) - len(fed)) + targets
    if eos is not None:
        ids, labels = ids + [eos], labels + [eos]
    return Example(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len)


def instruction_examples(
    items: list[Instruction], tokenizer, max_seq_len: int, train_on_prompt: bool
) -> list[Example | None]:
    """Examples of instruction records (see the module's docstring); None for one whose
    response no tokenisation reproduces after its prompt."""
    if not items:
        return []
    bos, eos = bos_token_id(tokenizer), tokenizer.eos_token_id
    prompts = encode(tokenizer, [it.prompt for it in items])
    wholes = encode(tokenizer, [it.prompt + it.response for it in items])
    out: list[Example | None] = []
    for item, prompt, whole in zip(items, prompts, wholes, strict=True):
        if whole[: len(prompt)] == prompt:
            response = whole[len(prompt) :]
        else:
            response = _response_alone(tokenizer, prompt, whole, item.response)
        if response is None:
            out.append(None)
            continue
        masked = prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
        out.append(_finish(prompt + response, masked + response, bos, eos, max_seq_len))
    return out


def document_examples(texts: list[str], tokenizer, max_seq_len: int) -> list[Example]:
    """Examples of plain texts: BOS (not a target), every token of the text, EOS."""
    if not texts:
        return []
    bos, eos = bos_token_id(tokenizer), tokenizer.eos_token_id
    return [_finish(ids, ids, bos, eos, max_seq_len) for ids in encode(tokenizer, texts)]


# ---------------------------------------------------------------------------------------
# Conversations


def require_chat_template(tokenizer) -> None:
    """Refuse the chat prompt template for a tokenizer that has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise S2FTError(
            "prompt_template: chat (or chat records) needs a tokenizer with a chat template; "
            "this tokenizer has none. Use prompt_template: alpaca or a chat model's tokenizer."
        )


class ChatTemplateError(ValueError):
    """The chat template cannot say exactly which tokens a record's turns are."""


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """The chat template's text of ``messages`` (and the assistant's header after them)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2 raises TemplateError or whatever the template raises
        raise ChatTemplateError(f"the chat template failed on it: {err}") from None


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, end-of-turn markers, ...)."""
    ids = set(tokenizer.all_special_ids)
    return ids | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _difference(a: str, b: str) -> str:
    pairs = enumerate(zip(a, b, strict=False))
    at = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    start = max(0, at - 10)
    return f"at character {at}: {a[start : at + 30]!r} against {b[start : at + 30]!r}"


def assistant_spans(tokenizer, messages: list[dict], text: str, ids, offsets, specials):
    """Character spans ``[start, end)`` of the assistant turns in ``text`` (the whole
    conversation rendered): from the end of the generation prompt before the turn up to
    the end of the first special token after it, or, in a template that closes a turn
    with no special token, to the end of the turn's own rendering. The second value says
    whether the last turn closed with a special token."""
    spans, closed = [], True
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        fed = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        if not text.startswith(fed):
            raise ChatTemplateError(
                f"the chat template renders the conversation before assistant message {i + 1} "
                "(as generation is prompted) differently from the same turns inside the whole "
                f"conversation ({_difference(fed, text)}): it rewrites earlier turns, so the "
                "whole conversation does not hold the tokens a model is fed before that turn. "
                "Split the conversation into one record per assistant turn (each ending with "
                "that turn), or use a template that renders earlier turns the same way"
            )
        start = len(fed)
        upto = render(tokenizer, messages[: i + 1])
        bound = len(upto) if text.startswith(upto) else None
        close = next(
            (end for t, (s, end) in zip(ids, offsets, strict=True) if s >= start and t in specials),
            None,
        )
        if close is not None and (bound is None or close <= bound):
            spans.append((start, close))
            closed = True
        elif bound is not None:
            spans.append((start, bound))
            closed = False
        else:
            raise ChatTemplateError(
                f"the chat template closes assistant message {i + 1} with no special token and "
                "renders it differently inside the whole conversation, so where the turn ends "
                "is unknown"
            )
    return spans, closed


class ChatRecordError(ValueError):
    """A conversation the chat template cannot tokenise with known targets: which one
    (its index in the list given) and why."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index = index


def chat_examples(
    conversations: list[list[dict]], tokenizer, max_seq_len: int, train_on_prompt: bool
) -> list[Example]:
    """The examples of conversations (see the module's docstring); raises
    :class:`ChatRecordError` for the first whose targets the template cannot tell."""
    if not conversations:
        return []
    require_chat_template(tokenizer)
    bos, specials = bos_token_id(tokenizer), special_ids(tokenizer)
    texts, failures = [], {}
    for k, messages in enumerate(conversations):  # rendered first, tokenised in batches
        try:
            texts.append(render(tokenizer, messages))
        except ChatTemplateError as err:
            texts.append("")
            failures[k] = err
    out = []
    for k, (messages, text, (ids, offsets)) in enumerate(
        zip(conversations, texts, encode(tokenizer, texts, offsets=True), strict=True)
    ):
        try:
            if k in failures:  # the first failing record is reported, as it comes
                raise failures[k]
            spans, closed = assistant_spans(tokenizer, messages, text, ids, offsets, specials)
        except ChatTemplateError as err:
            raise ChatRecordError(k, str(err)) from None
        labels = [
            t if train_on_prompt or any(end > s and begin < e for s, e in spans) else IGNORE_INDEX
            for t, (begin, end) in zip(ids, offsets, strict=True)
        ]
        # a template that ends turns with no special token: EOS teaches generation to stop
        eos = None if closed else tokenizer.eos_token_id
        out.append(_finish(ids, labels, bos, eos, max_seq_len))
    return out
