"""What a record asks of the model: the paper's Alpaca prompt, the user turn of an
instruction under a chat template, and every record format read as an instruction (prompt
and response), a document, or a conversation."""

from __future__ import annotations

from .tokenization import Document, Instruction

# The Alpaca prompt the paper's training and evaluation use (Stanford Alpaca / LLM-Adapters).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def user_message(instruction: str, input: str = "") -> str:
    """An instruction record's user turn under ``prompt_template: chat``."""
    return f"{instruction}\n\n{input}" if input else instruction


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an instruction record, up to and including ``### Response:``."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def _str_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"field {key!r} must be a string, got {type(value).__name__}"
            if key in record
            else f"it has no {key!r} field"
        )
    return value


def parse_record(record, fmt: str, prompt_template: str) -> Instruction | Document | list[dict]:
    """A record as an instruction, a document, or a conversation (a message list; an
    instruction record under ``prompt_template: chat`` becomes a user/assistant one)."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object, got {type(record).__name__}")
    if fmt == "hf":
        fmt = "chat" if "messages" in record else "text" if "text" in record else "alpaca"
    if fmt in ("llm-adapters", "alpaca"):
        instruction = _str_field(record, "instruction")
        extra, output = _str_field(record, "input", required=False), _str_field(record, "output")
        if prompt_template == "chat":
            return [
                {"role": "user", "content": user_message(instruction, extra)},
                {"role": "assistant", "content": output},
            ]
        return Instruction(alpaca_prompt(instruction, extra), output)
    if fmt == "text":
        return Document(_str_field(record, "text"))
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("it needs a non-empty 'messages' list")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError(
                "each message needs a 'role' (system, user or assistant) and a string 'content'"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("it has no assistant message to learn from")
    return messages
