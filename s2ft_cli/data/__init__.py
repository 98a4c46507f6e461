"""Data (recipe ``data:``): sources → records → examples → batches.

* :mod:`.records`: files, hub datasets and the built-in generator (:mod:`.arithmetic`);
* :mod:`.templates`: the Alpaca prompt and every format read as an instruction, a document
  or a conversation;
* :mod:`.tokenization`: the tokens of an example, as inference sees them;
* :mod:`.examples`: a recipe's data checked and tokenised, with what became of it;
* :mod:`.batches`: the data order of an epoch, padded batches, packed rows, calibration
  draws;
* :mod:`.preview`: ``s2ft data``.
"""

from .arithmetic import arithmetic_problems
from .batches import (
    StepPlan,
    calibration_batches,
    collate,
    epoch_order,
    pack_examples,
    target_count,
    training_plan,
)
from .examples import Datasets, SourceStats, build_examples, load_datasets, split_validation
from .records import BUILTIN_PREFIX, FORMATS, load_records, read_record_file
from .templates import alpaca_prompt, user_message
from .tokenization import IGNORE_INDEX, Example, prompt_ids, require_chat_template

__all__ = [
    "BUILTIN_PREFIX",
    "FORMATS",
    "IGNORE_INDEX",
    "Datasets",
    "Example",
    "SourceStats",
    "StepPlan",
    "alpaca_prompt",
    "arithmetic_problems",
    "build_examples",
    "calibration_batches",
    "collate",
    "epoch_order",
    "load_datasets",
    "load_records",
    "pack_examples",
    "prompt_ids",
    "read_record_file",
    "require_chat_template",
    "split_validation",
    "target_count",
    "training_plan",
    "user_message",
]
