"""Records from files, hubs and the built-in generator.

Formats: ``llm-adapters`` / ``alpaca`` (JSON or JSONL records with ``instruction``, optional
``input``, ``output``; the paper's training sets), ``chat`` (records with ``messages``),
``text`` (records with ``text``, or a ``.txt`` file of blank-line separated documents) and
``hf`` (any Hugging Face ``datasets`` source: a hub name or a local data file; each row is
read as one of the other formats by its keys). ``builtin:arithmetic`` generates small
arithmetic word problems in the LLM-Adapters format, so the quickstart needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import S2FTError
from ..files import read_json
from .arithmetic import SPLITS, arithmetic_problems

FORMATS = ("llm-adapters", "alpaca", "chat", "text", "hf")
BUILTIN_PREFIX = "builtin:"


def read_record_file(path: Path) -> list:
    """The records of a JSON list, a JSONL file or a ``.txt`` file of documents."""
    if path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text().split("\n\n")]
        return [{"text": d} for d in docs if d]
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise S2FTError(
                    f"{path}: line {n} is not valid JSON ({err}); fix or remove that line (a "
                    ".jsonl file holds one JSON record per line)."
                ) from None
        return records
    data = read_json(path, "give a JSON list of records or a .jsonl file with one record per line.")
    if not isinstance(data, list):
        raise S2FTError(
            f"{path} must hold a JSON list of records, not a {type(data).__name__}; wrap the "
            "records in [...] or write one record per line to a .jsonl file."
        )
    return data


def _read_hf(path: str, subset: str | None, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise S2FTError("format: hf needs the `datasets` package: pip install datasets.") from None
    local = Path(path)
    try:
        if local.is_file():
            builder = {
                ".json": "json",
                ".jsonl": "json",
                ".csv": "csv",
                ".parquet": "parquet",
                ".txt": "text",
            }.get(local.suffix)
            if builder is None:
                raise S2FTError(f"{path}: format hf reads .json, .jsonl, .csv, .parquet or .txt.")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split)
        else:
            ds = datasets.load_dataset(path, subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise S2FTError(f"Could not load the dataset {path!r} (split {split!r}): {err}") from None
    return list(ds)


def load_records(source, seed: int = 0) -> tuple[str, list]:
    """Read a data source (a recipe's ``data.train`` / ``data.validation``): its name for
    messages, and its raw records."""
    path = source.path
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name != "arithmetic":
            raise S2FTError(f"Unknown built-in dataset {path!r}; available: builtin:arithmetic.")
        if source.split not in SPLITS:
            raise S2FTError(
                f"{path} has the splits train and test (held-out problems), not "
                f"{source.split!r}; set data.*.split to train or test."
            )
        return path, arithmetic_problems(source.limit or 2000, seed, source.split)
    if source.format == "hf":
        records = _read_hf(path, source.subset, source.split)
    else:
        file = Path(path)
        if not file.is_file():
            raise S2FTError(
                f"Data file {file} does not exist. Check data.*.path (relative paths in a recipe "
                "resolve against its folder, those given on the command line against the "
                "current folder)."
            )
        records = read_record_file(file)
    if source.limit is not None:
        records = records[: source.limit]
    if not records:
        raise S2FTError(f"{path} holds no records.")
    return path, records
