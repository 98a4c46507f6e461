"""The paper's reasoning tasks and their answer rules (paper §4, LLM-Adapters protocol).

Eight commonsense sets answered with a label word (``true``/``false``, ``solution1/2``,
``answer1..5``, ``ending1..4``, ``option1/2``) and seven arithmetic sets answered with a
number (AQuA with a letter). Extraction follows the S²FT / LLM-Adapters evaluation code:

* commonsense: the first occurrence of one of the task's label words in the lower-cased
  output (plain substring search, as the original regular expression does); correct when
  it equals the lower-cased gold label;
* arithmetic: the last number (``-?\\d+\\.?\\d*``) in the output with commas removed;
  correct when within 0.001 of the gold answer;
* AQuA: the first capital letter A–E in the output; correct when it equals the gold letter.

This module is plain Python: re-scoring saved outputs needs no model and no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import S2FTError

# Tolerance of an arithmetic answer (the paper's ``miss``).
NUMBER_TOLERANCE = 0.001
# The answer sentence of the commonsense training and test sets (LLM-Adapters).
ANSWER_SENTENCE = "the correct answer is {label}"
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"A|B|C|D|E")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9/]+)")


@dataclass(frozen=True)
class Task:
    """One evaluation set and how its answers are read and judged."""

    name: str
    group: str  # commonsense | math
    kind: str  # label | number | letter
    labels: tuple[str, ...] = ()
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = {"number": _NUMBER, "letter": _LETTER}.get(self.kind)
        object.__setattr__(self, "pattern", pattern or re.compile("|".join(self.labels)))

    def extract(self, output: str) -> str | float | None:
        """The prediction in a model's output, or None when there is none."""
        if self.kind == "label":
            found = self.pattern.search(output.lower())
            return found.group(0) if found else None
        if self.kind == "letter":
            found = self.pattern.search(output.strip())
            return found.group(0) if found else None
        numbers = self.pattern.findall(output.replace(",", ""))
        return float(numbers[-1]) if numbers else None

    def is_correct(self, prediction: str | float | None, answer: str | float) -> bool:
        """Whether a prediction matches the gold answer (``answer`` as parsed by
        :meth:`gold`)."""
        if prediction is None:
            return False
        if self.kind == "number":
            return abs(answer - prediction) <= NUMBER_TOLERANCE
        return prediction == answer

    def gold(self, answer) -> str | float:
        """The gold answer as compared: lower-cased label, float, or the letter as is.
        Raises ValueError when it cannot be one."""
        if self.kind == "number":
            if isinstance(answer, bool) or not isinstance(answer, str | int | float):
                raise ValueError(f"the answer must be a number, got {answer!r}")
            return float(str(answer).replace(",", "")) if isinstance(answer, str) else answer
        if not isinstance(answer, str):
            raise ValueError(f"the answer must be a string, got {answer!r}")
        return answer.lower() if self.kind == "label" else answer

    def candidates(self, instruction: str) -> tuple[str, ...]:
        """The labels a question offers (its ``Answer format:`` line), for likelihood
        scoring; all the task's labels when the line is missing."""
        found = _ANSWER_FORMAT.findall(instruction)
        if found:
            offered = tuple(x.lower() for x in found[-1].split("/") if x.lower() in self.labels)
            if len(offered) >= 2:
                return offered
        return self.labels


def _answers(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("boolq", "commonsense", "label", ("true", "false")),
        Task("piqa", "commonsense", "label", _answers("solution", 2)),
        Task("social_i_qa", "commonsense", "label", _answers("answer", 5)),
        Task("hellaswag", "commonsense", "label", _answers("ending", 4)),
        Task("winogrande", "commonsense", "label", _answers("option", 2)),
        Task("ARC-Easy", "commonsense", "label", _answers("answer", 5)),
        Task("ARC-Challenge", "commonsense", "label", _answers("answer", 5)),
        Task("openbookqa", "commonsense", "label", _answers("answer", 5)),
        Task("MultiArith", "math", "number"),
        Task("gsm8k", "math", "number"),
        Task("AddSub", "math", "number"),
        Task("AQuA", "math", "letter"),
        Task("SingleEq", "math", "number"),
        Task("SVAMP", "math", "number"),
        Task("mawps", "math", "number"),
    )
}
GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(t.name for t in TASKS.values() if t.group == group)
    for group in ("commonsense", "math")
}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


# short names other evaluation code uses
ALIASES = {"siqa": "social_i_qa", "obqa": "openbookqa", "arcc": "ARC-Challenge", "arce": "ARC-Easy"}
_BY_KEY = {_key(name): name for name in TASKS} | ALIASES


def task_named(name: str) -> Task:
    """A task by name, ignoring case, ``-`` and ``_`` (``arc_easy`` is ``ARC-Easy``), or
    by a short name (``siqa``, ``obqa``, ``arc_c``, ``arc_e``)."""
    found = _BY_KEY.get(_key(str(name)))
    if found is None:
        raise S2FTError(
            f"Unknown task {name!r}. Tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}."
        )
    return TASKS[found]


def resolve_tasks(names: list[str] | str | None) -> list[Task]:
    """Task names and groups (a list, or one comma-separated string) as tasks in the
    canonical order, each once; None means every task."""
    if names is None:
        return list(TASKS.values())
    if isinstance(names, str):
        names = [names]
    chosen: set[str] = set()
    for item in names:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name.lower() in GROUPS:
                chosen.update(GROUPS[name.lower()])
            else:
                chosen.add(task_named(name).name)
    if not chosen:
        raise S2FTError("No task given; name tasks or groups, e.g. --tasks boolq,gsm8k or math.")
    return [t for t in TASKS.values() if t.name in chosen]


def task_in_path(path: Path) -> Task | None:
    """The task a test file belongs to, read from its folder names (``…/gsm8k/test.json``)."""
    for part in reversed(path.resolve().parts):
        name = _BY_KEY.get(_key(Path(part).stem))
        if name is not None:
            return TASKS[name]
    return None


def test_file(data_dir: Path, task: Task) -> Path | None:
    """``<task>/test.json`` (or ``.jsonl``) in ``data_dir`` or in its ``dataset/`` folder."""
    for folder in (data_dir, data_dir / "dataset"):
        for name in ("test.json", "test.jsonl"):
            if (folder / task.name / name).is_file():
                return folder / task.name / name
    return None
