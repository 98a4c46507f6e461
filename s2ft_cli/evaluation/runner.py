"""``s2ft eval``: a base model, with each adapter in turn, on the chosen test sets.

The test sets are read and checked before the model loads: files of the paper's sets, or
the held-out part of a built-in generator (``builtin:arithmetic``). Each process of a
``torchrun`` / ``accelerate launch`` run takes every ``world``-th example of a task; rank 0
gathers the outputs, scores them and writes ``results.json`` and ``predictions.jsonl``
(in ``out``, or in ``out/<name>`` when several models are evaluated: adapters, and the
base itself as ``base`` when asked).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..adapter.runtime import load_adapter, merge_adapter, unload_adapter, unmerge_adapter
from ..data import (
    BUILTIN_PREFIX,
    load_records,
    prompt_ids,
    read_record_file,
    require_chat_template,
)
from ..engine.models import load_model, load_tokenizer
from ..errors import S2FTError
from ..recipe import DataSource, EvalSection
from ..tables import comparison_table, results_table
from ..training.distributed import Processes, setup_processes
from ..version import __version__
from . import decoding
from .report import score, summarize, writable_folder, write_results
from .tasks import TASKS, Task, resolve_tasks, task_in_path, test_file

# Held-out problems a built-in source gives when eval.limit does not say how many.
BUILTIN_TEST_SIZE = 500
# The name of the base model's results when it is evaluated beside adapters.
BASE = "base"


@dataclass
class TestSet:
    """A task's test records (already cut to ``limit``) and the file (or built-in
    source) they came from."""

    task: Task
    path: Path | str
    records: list[dict]


def _check_records(records: list, task: Task, path: Path) -> None:
    for n, record in enumerate(records, 1):
        problem = None
        if not isinstance(record, dict):
            problem = f"a record must be an object, got {type(record).__name__}"
        elif not isinstance(record.get("instruction"), str):
            problem = "it needs an 'instruction' string"
        elif "answer" not in record:
            problem = "it has no 'answer'"
        else:
            try:
                task.gold(record["answer"])
            except ValueError as err:
                problem = str(err)
        if problem:
            raise S2FTError(
                f"{path}: record {n} is malformed: {problem}. LLM-Adapters test records hold "
                "'instruction', 'input' (optional) and 'answer'; fix or remove the record."
            )


def builtin_test_set(source: str, settings: EvalSection) -> TestSet:
    """The held-out test part of a built-in generator (``builtin:arithmetic``): ``limit``
    problems (500 unless told) none of which shares its operation and operands with a
    training problem; scored as the task of the same name."""
    limit = settings.limit or BUILTIN_TEST_SIZE
    _, records = load_records(DataSource(path=source, split="test", limit=limit))
    task = TASKS[source[len(BUILTIN_PREFIX) :]]
    if settings.tasks is not None and resolve_tasks(settings.tasks) != [task]:
        raise S2FTError(
            f"{source} gives held-out problems of the task {task.name} only; leave out --tasks "
            f"(eval.tasks) or give --tasks {task.name}."
        )
    return TestSet(task, source, records)


def load_test_sets(settings: EvalSection) -> tuple[list[TestSet], list[str]]:
    """The test sets the settings name, checked, and notes on tasks left out."""
    if settings.data_dir is None:
        raise S2FTError(
            "No test data: give --data-dir (eval.data_dir), a folder of LLM-Adapters test sets "
            "(<task>/test.json, e.g. LLM-Adapters' dataset/ folder), one test file, or "
            "builtin:arithmetic (held-out generated problems)."
        )
    if settings.data_dir.startswith(BUILTIN_PREFIX):
        return [builtin_test_set(settings.data_dir, settings)], []
    where = Path(settings.data_dir).expanduser()
    asked = resolve_tasks(settings.tasks) if settings.tasks is not None else None
    notes: list[str] = []
    if where.is_file():
        task = asked[0] if asked is not None and len(asked) == 1 else task_in_path(where)
        if task is None or (asked is not None and task not in asked):
            raise S2FTError(
                f"Which task is {where}? Name exactly one with --tasks (e.g. --tasks gsm8k); "
                "its answer rules apply to every record of the file."
            )
        found = [(task, where)]
    elif where.is_dir():
        found = []
        for task in asked or resolve_tasks(None):
            path = test_file(where, task)
            if path is not None:
                found.append((task, path))
            elif asked is not None:
                raise S2FTError(
                    f"No test file for {task.name} in {where}: expected "
                    f"{where / task.name / 'test.json'} (or under {where / 'dataset'}). Point "
                    "--data-dir at the folder holding the task folders, or leave the task out."
                )
        if not found:
            raise S2FTError(
                f"{where} holds no test set (no <task>/test.json for any of the tasks); point "
                "--data-dir at LLM-Adapters' dataset/ folder or at one test file."
            )
    else:
        raise S2FTError(f"--data-dir {where} does not exist; give a folder or a test file.")
    sets = []
    for task, path in found:
        records = read_record_file(path)
        if not records:
            raise S2FTError(f"{path} holds no test records; give a non-empty test file.")
        _check_records(records, task, path)
        sets.append(TestSet(task, path, records[: settings.limit]))
    if settings.mode == "loglik":
        generated = [s.task.name for s in sets if s.task.kind != "label"]
        if generated:
            notes.append(
                f"loglik scores label words; {', '.join(generated)} ha"
                f"{'s' if len(generated) == 1 else 've'} none and "
                f"{'is' if len(generated) == 1 else 'are'} evaluated by generation"
            )
    return sets, notes


def adapter_names(adapters: list[Path], taken: tuple[str, ...] = ()) -> list[str]:
    """Short distinct names, none of them in ``taken``: the adapter's folder, or its run's
    folder for ``…/adapter``."""
    names: list[str] = []
    for path in adapters:
        path = path.resolve()
        base = path.parent.name if path.name == "adapter" else path.name
        name, k = base, 2
        while name in names or name in taken:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


@contextmanager
def adapter_applied(
    model, adapter: Path | None, merge: bool = False, force: bool = False
) -> Iterator[None]:
    """The model with ``adapter`` attached (unfused) or fused while the block runs; the
    base again afterwards, exactly. ``None``: the base model itself."""
    if adapter is None:
        yield
        return
    load_adapter(model, adapter, force=force)
    if merge:
        merge_adapter(model)
    try:
        yield
    finally:
        unmerge_adapter(model) if merge else unload_adapter(model)


class Evaluator:
    """One model and tokenizer, run over test sets on this process's share of examples."""

    def __init__(
        self,
        model_name: str,
        settings: EvalSection,
        dtype: str | None,
        prompt_template: str,
        trust_remote_code: bool = False,
        model_seed: int = 0,
        console: Console | None = None,
        model=None,
    ):
        """``model``: one already in memory (say, fine-tuned and merged by a script) to
        evaluate instead of loading ``model_name``, which then only names it."""
        self.settings, self.template = settings, prompt_template
        self.console = console or Console()
        self.procs: Processes = setup_processes(settings.device, key="eval.device")
        # unless told: bf16 on a GPU, as the paper evaluates; float32 on a CPU
        dtype = dtype or ("bfloat16" if self.procs.device.type == "cuda" else "float32")
        self.model_name, self.dtype = model_name, dtype
        self.tokenizer = load_tokenizer(model_name, trust_remote_code)
        if prompt_template == "chat":
            require_chat_template(self.tokenizer)
        if model is None:
            model = load_model(model_name, dtype, trust_remote_code, seed=model_seed)
        self.model = model.to(self.procs.device).eval()

    def _outputs(self, test: TestSet, share: list[int], prompts: list[str], advance) -> list[dict]:
        """This process's outputs for the examples ``share`` of a test set."""
        records = [test.records[i] for i in share]
        if self.settings.mode == "loglik" and test.task.kind == "label":
            logliks = decoding.answer_logliks(
                self.model,
                self.tokenizer,
                records,
                test.task,
                self.template,
                self.settings.batch_size,
                self.procs.device,
                advance,
            )
            return [
                {"output": decoding.answer_output(decoding.best_label(s)), "logliks": s}
                for s in logliks
            ]
        texts = decoding.generate(
            self.model,
            self.tokenizer,
            prompt_ids(self.tokenizer, [prompts[i] for i in share]),
            self.settings,
            test.task,
            self.procs.device,
            advance,
        )
        return [{"output": t} for t in texts]

    def run(self, sets: list[TestSet], label: str) -> tuple[dict, list[dict]] | None:
        """Evaluate the current model on every test set; on rank 0 the results and the
        scored predictions, elsewhere None."""
        procs = self.procs
        progress = Progress(
            TextColumn("[bold]{task.description:>14}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not procs.is_main,
        )
        rows: list[dict] = []
        timing: dict[str, dict] = {}
        with progress:
            for test in sets:
                share = list(range(procs.rank, len(test.records), procs.world))
                prompts = [
                    decoding.prompt_text(r, self.tokenizer, self.template) for r in test.records
                ]
                bar = progress.add_task(test.task.name, total=len(share))
                started = time.perf_counter()
                advance = lambda n, b=bar: progress.advance(b, n)  # noqa: E731
                outputs = self._outputs(test, share, prompts, advance)
                gathered = procs.gather(list(zip(share, outputs, strict=True)))
                seconds = time.perf_counter() - started
                progress.update(bar, completed=len(share))
                if gathered is None:
                    continue
                pairs = sorted((p for part in gathered for p in part), key=lambda p: p[0])
                for index, out in pairs:
                    record = test.records[index]
                    rows.append(
                        {"task": test.task.name, "index": index, "prompt": prompts[index]}
                        | {"output": out["output"], "answer": record["answer"]}
                        | ({"logliks": out["logliks"]} if "logliks" in out else {})
                    )
                n = len(test.records)
                timing[test.task.name] = {"seconds": seconds, "examples_per_s": n / seconds}
        if not procs.is_main:
            return None
        scored = score(rows, label)
        results = summarize(scored) | {"timing": timing, "settings": self._settings(label)}
        return results, scored

    def _settings(self, label: str) -> dict:
        s = self.settings
        decoding_settings = {"max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams}
        if s.do_sample:
            decoding_settings |= {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
        return {
            "model": self.model_name,
            "adapter": label,
            "mode": s.mode,
            "prompt_template": self.template,
            "dtype": self.dtype,
            "do_sample": s.do_sample,
            **decoding_settings,
            "stop_at_answer": s.stop_at_answer,
            "batch_size": s.batch_size,
            "limit": s.limit,
            "processes": self.procs.world,
            "seed": s.seed,
            "merged": s.merge,
            "tool_version": f"s2ft {__version__}",
        }


def evaluate(
    model_name: str,
    settings: EvalSection,
    adapters: list[Path],
    out: Path,
    dtype: str | None = None,
    prompt_template: str = "alpaca",
    trust_remote_code: bool = False,
    model_seed: int = 0,
    console: Console | None = None,
) -> dict[str, dict]:
    """Evaluate the base model (no adapters, or ``settings.include_base``) and each
    adapter on it; write the results and print tables on rank 0 (a comparison table for
    several). Returns ``{name: results}`` on rank 0, ``{}`` elsewhere; the base model is
    named ``base``. ``dtype`` None: bfloat16 on CUDA, float32 on a CPU. ``model_seed``
    initialises a preset model as its training run did."""
    console = console or Console()
    sets, notes = load_test_sets(settings)
    for adapter in adapters:
        if not adapter.is_dir():
            raise S2FTError(f"Adapter {adapter} does not exist; give an adapter directory.")
    # the base is simply "no adapter": first, when asked or when there is nothing else
    with_base = settings.include_base or not adapters
    targets: list[tuple[str, Path | None]] = [(BASE, None)] if with_base else []
    targets += zip(adapter_names(adapters, (BASE,) if with_base else ()), adapters, strict=True)
    folders = [out / name for name, _ in targets] if len(targets) > 1 else [out]
    for folder in folders:  # before hours of generation, not after
        writable_folder(folder)
    evaluator = Evaluator(
        model_name,
        settings,
        dtype,
        prompt_template,
        trust_remote_code=trust_remote_code,
        model_seed=model_seed,
        console=console,
    )
    procs = evaluator.procs
    try:
        if procs.is_main:
            total = sum(len(s.records) for s in sets)
            console.print(
                f"[bold]s2ft eval[/] {model_name} on {procs.device} ({procs.world} "
                f"process{'es' if procs.world > 1 else ''}): {len(sets)} tasks, {total} "
                f"examples, mode {settings.mode}, {prompt_template} prompt",
                highlight=False,
            )
            for note in notes:
                console.print(f"  [yellow]note:[/] {note}", highlight=False)
        for adapter in adapters:  # a wrong adapter fails now, not after the others ran
            with adapter_applied(evaluator.model, adapter, force=settings.force):
                pass
        named: dict[str, dict] = {}
        for (name, adapter), folder in zip(targets, folders, strict=True):
            if procs.is_main and adapter is not None:
                console.print(f"adapter {name}: {adapter}", highlight=False)
            # checked against the base above: the fingerprint is not computed again
            with adapter_applied(evaluator.model, adapter, settings.merge, force=True):
                done = evaluator.run(sets, str(adapter) if adapter else "none")
            if done is None:
                continue
            results, scored = done
            write_results(folder, results, scored)
            console.print(results_table(f"{name} — {model_name}", results))
            console.print(f"results written to {folder}", highlight=False)
            named[name] = results
        if len(named) > 1:
            console.print(comparison_table(named))
        procs.barrier()
        return named
    finally:
        procs.close()
