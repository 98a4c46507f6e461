"""Generated arithmetic word problems (``builtin:arithmetic``), with a held-out part.

Each problem is one of three operations on an operand pair (``a + b``, ``a - b``,
``a * b``) told as a short story with a name and a kind of thing, and answered in the
LLM-Adapters format (``instruction``, ``input``, ``output`` with the worked sum, ``answer``).
The problem space — operation and operand pair — is cut once and for all by a hash into a
training part (80%) and a test part (20%): ``split="train"`` draws only from the first,
``split="test"`` only from the second, so whatever the seeds and counts no test problem's
``(operation, a, b)`` is ever trained on; names and things vary freely in both. A split is
the full generator's stream of problems with the other part's problems left out, so the
training problems keep the generator's distribution (restricted to their part).
"""

from __future__ import annotations

import hashlib
import random

SPLITS = ("train", "test")
# Share of the (operation, a, b) space held out for testing, in percent.
TEST_PERCENT = 20
_NAMES = ["Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy"]
_THINGS = ["apples", "books", "coins", "stickers", "marbles", "shells"]


def held_out(operation: str, a: int, b: int) -> bool:
    """Whether a problem belongs to the test part: a fixed hash of its operation (``add``,
    ``sub``, ``mul``) and operands as they appear in the worked answer."""
    digest = hashlib.blake2b(f"{operation} {a} {b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < TEST_PERCENT


def _problem(rng: random.Random) -> tuple[tuple[str, int, int], dict]:
    """One problem drawn from the whole space: its key and its record."""
    who, what = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
        work, ans = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{who} has {a} {what} and gives away {b}. How many {what} are left?"
        work, ans = f"{a} - {b} = {a - b}", a - b
    else:
        a, b = a % 12 + 2, b % 9 + 2
        q = f"{who} has {a} bags with {b} {what} in each. How many {what} are there?"
        work, ans = f"{a} * {b} = {a * b}", a * b
    record = {
        "instruction": q,
        "input": "",
        "output": f"{work}. The answer is {ans}.",
        "answer": str(ans),
    }
    return (kind, a, b), record


def arithmetic_problems(count: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``count`` arithmetic word problems with worked answers, in the LLM-Adapters format,
    from the training or the held-out test part of the problem space."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng, test = random.Random(seed), split == "test"
    records: list[dict] = []
    while len(records) < count:
        key, record = _problem(rng)
        if held_out(*key) == test:
            records.append(record)
    return records
