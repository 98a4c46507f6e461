"""What ``s2ft eval`` evaluates, resolved from its source (a recipe or a training run's
directory), the recipe's ``eval:`` section and the command line's options before any
model loads (no torch here): the base model, the adapters, the settings, where the results
go."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..errors import S2FTError
from ..recipe import EvalSection, eval_settings, load_recipe, run_directory
from .tasks import known_tasks


@dataclass
class EvalRequest:
    """Everything :func:`~.runner.evaluate` takes."""

    model_name: str
    settings: EvalSection
    adapters: list[Path]
    out: Path
    dtype: str | None
    prompt_template: str
    trust_remote_code: bool
    model_seed: int

    def run(self, console: Console | None = None) -> dict[str, dict]:
        """Evaluate (loads torch and the model); the results by model name."""
        from .runner import evaluate

        return evaluate(
            self.model_name, self.settings, self.adapters, self.out, self.dtype,
            self.prompt_template, self.trust_remote_code, self.model_seed, console,
        )  # fmt: skip


def eval_request(
    source: Path | None, overrides: list[str] | None, model: str | None, options: dict
) -> EvalRequest:
    """The evaluation ``s2ft eval SOURCE [key=value ...] --model ... [options]`` asks for:
    the recipe's model and eval section (a run's adapter when it has one) under the options;
    ``--model`` alone evaluates a base model."""
    recipe, run_dir = None, None
    if source is not None:
        recipe_path, run_dir = run_directory(source)
        recipe = load_recipe(recipe_path, overrides)
        run_dir = run_dir or Path(recipe.output_dir)
    elif overrides:
        raise S2FTError(
            f"key=value overrides ({overrides[0]}) need a recipe; give one, or use the options."
        )
    settings = eval_settings(recipe.eval if recipe else None, options)
    known_tasks(settings.tasks, "--tasks (eval.tasks)")
    model_name = model or (recipe.model.name_or_path if recipe else None)
    if model_name is None:
        raise S2FTError(
            "Which model? Give --model (hub id, local directory or preset), a recipe, or a "
            "training run's directory."
        )
    adapters = [Path(a) for a in settings.adapters or []]
    if settings.adapters is None and run_dir is not None and (run_dir / "adapter").is_dir():
        adapters = [run_dir / "adapter"]
    default_out = (
        run_dir / "eval" if run_dir else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return EvalRequest(
        model_name,
        settings,
        adapters,
        Path(settings.out) if settings.out else default_out,
        dtype=settings.dtype or (recipe.model.dtype if recipe else None),
        prompt_template=settings.prompt_template
        or (recipe.data.prompt_template if recipe and recipe.data else "alpaca"),
        trust_remote_code=recipe.model.trust_remote_code if recipe else False,
        model_seed=recipe.train.seed if recipe else 0,
    )
