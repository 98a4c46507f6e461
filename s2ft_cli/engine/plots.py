"""A picture of a selection: the strategy's scores (layers × units) with the chosen units
marked, one panel per target matrix. Needs matplotlib (``pip install 's2ft[plot]'``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import S2FTError
from ..files import atomic_write_file
from .selection import Selection
from .targets import TARGETS


def selection_heatmap(selection: Selection, path: str | Path) -> Path:
    """Write a PNG heatmap of ``selection`` (as ``select_units`` made it, with its scores)
    to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise S2FTError(
            "--plot needs matplotlib: pip install 's2ft[plot]' (or pip install matplotlib)."
        ) from None
    config, shape = selection.config, selection.shape
    layers = selection.scored or list(range(shape.num_layers))
    matrices = list(config.targets)
    fig, axes = plt.subplots(
        len(matrices), 1, figsize=(10, 1.2 + 0.35 * len(layers) * len(matrices)), squeeze=False
    )
    for ax, matrix in zip(axes[:, 0], matrices, strict=True):
        n = shape.num_units(matrix)
        image = selection.scores[matrix].float().numpy()
        shown = ax.imshow(image, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(shown, ax=ax, label=f"{config.strategy} score")
        points = [
            (unit, row)
            for row, layer in enumerate(layers)
            for unit in selection.units.get(layer, {}).get(matrix, [])
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, marker="s", s=12, facecolors="none", edgecolors="red", linewidths=1)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_ylabel("layer")
        ax.set_xlabel(TARGETS[matrix].unit.value)
        ax.set_title(
            f"{matrix}: {sum(len(pm.get(matrix, [])) for pm in selection.units.values())} of "
            f"{n * len(layers)} units selected (red), strategy {config.strategy}, order "
            f"{config.order}, allocation {config.allocation}",
            fontsize=9,
        )
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    finally:
        plt.close(fig)
    return path
