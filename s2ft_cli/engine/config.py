"""``S2FTConfig``: what to train — which matrices, how many of their units, chosen how."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .targets import TARGET_MATRICES, structure_matrices

# S²FT-R, -W, -A, -S (weight × activation) and -G of the paper's §4 / Table 5
STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
DATA_STRATEGIES = ("activation", "weight_activation", "gradient")
MAX_TARGETS_PER_STRUCTURE = 2


class Calibration(BaseModel):
    """``s2ft.calibration``: the data that activation and gradient scores are measured on:
    ``samples`` training examples (a seeded draw), in batches of ``batch_size``."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(64, ge=1, description="Training examples to measure on.")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")


class S2FTConfig(BaseModel):
    """The ``s2ft:`` section of a recipe, and the library's configuration object."""

    model_config = ConfigDict(extra="forbid")

    targets: dict[str, float] = Field(
        description="Matrix name -> fraction of its units to train: query heads for q_proj "
        "and o_proj, key/value heads for k_proj and v_proj, intermediate channels for "
        "gate_proj, up_proj and down_proj (paper §3).",
    )
    strategy: str = Field(
        "random",
        description="How units are scored (paper §4): random (S²FT-R), weight (norm of the "
        "unit's rows/columns), activation (mean |activation| on calibration data), "
        "weight_activation (their product), gradient (norm of the unit's loss gradient on "
        "calibration data).",
    )
    order: Literal["large", "small"] = Field(
        "large", description="Take the units with the largest or the smallest scores."
    )
    calibration: Calibration = Field(
        default_factory=Calibration,
        description="Training examples that activation and gradient scores are measured on.",
    )
    allocation: Literal["global", "per_layer"] = Field(
        "global",
        description="global: int(ratio × layers × units) units drawn over all layers at once, "
        "as the paper's code does; per_layer: int(ratio × units) units in every layer.",
    )
    max_units_per_layer: int | None = Field(
        None,
        ge=1,
        description="allocation global: at most this many units of a matrix in one layer "
        "(the draw passes over a full layer to the next best unit). It bounds the LoRA rank "
        "a serving engine must reserve for the PEFT export: units × head_dim for heads, "
        "units for FFN channels.",
    )
    layers: list[int] | None = Field(
        None, description="Only these layer indices are trained (default: all)."
    )
    seed: int = Field(0, description="Seed of the selection.")

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, targets: dict[str, float]) -> dict[str, float]:
        if not targets:
            raise ValueError(
                "no target matrices given; e.g. {o_proj: 0.05, down_proj: 0.02} (the paper's setup)"
            )
        for name, ratio in targets.items():
            if name not in TARGET_MATRICES:
                raise ValueError(
                    f"unknown target matrix {name!r}; valid targets: {', '.join(TARGET_MATRICES)}"
                )
            if not 0.0 < ratio <= 1.0:
                raise ValueError(
                    f"the ratio of {name} is {ratio}; it must be in (0, 1] (the fraction of "
                    "units to train; leave a matrix out to freeze it)"
                )
        for structure, label, example in (
            ("attention", "attention", "v_proj + o_proj"),
            ("ffn", "FFN", "up_proj + down_proj"),
        ):
            chosen = [m for m in structure_matrices(structure) if m in targets]
            if len(chosen) > MAX_TARGETS_PER_STRUCTURE:
                raise ValueError(
                    f"{' + '.join(chosen)} are all in the {label} structure; with independent "
                    f"selections at most {MAX_TARGETS_PER_STRUCTURE} trainable matrices per "
                    "structure can be co-permuted into contiguous blocks (order only_A + both + "
                    f"only_B + rest, paper §3.2). Keep two, e.g. {example}"
                )
        return {m: targets[m] for m in TARGET_MATRICES if m in targets}

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, strategy: str) -> str:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
        return strategy

    @model_validator(mode="after")
    def _check_cap(self) -> S2FTConfig:
        if self.max_units_per_layer is not None and self.allocation != "global":
            raise ValueError(
                "max_units_per_layer caps the global allocation; per_layer already trains "
                "the same number of units in every layer"
            )
        return self

    @model_validator(mode="after")
    def _check_layers(self) -> S2FTConfig:
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers is an empty list; leave it out to train all layers")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers {self.layers} must be distinct non-negative indices")
            self.layers = sorted(self.layers)
        return self
