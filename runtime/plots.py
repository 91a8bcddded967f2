"""Plots of a demo report: per-class head usage unsteered vs steered, and a class x head heatmap
of the heads kept in the final (steered) block. matplotlib with the file-only Agg backend."""
from __future__ import annotations

from pathlib import Path

from headsteer.runtime.files import atomic_path

PLOTS = ("per_class_usage", "kept_heads")


def _plot_path(out: Path, name: str, suffix: str) -> Path:
    """Where plot `name` (one of PLOTS) goes; suffix "_all" for the whole-network report's."""
    return Path(out) / f"{name}{suffix}.png"


def plot_paths(out: Path, whole_network: bool) -> list[Path]:
    """The files `write_plots` writes under `out` for a report with (or without) whole_network."""
    suffixes = ("", "_all") if whole_network else ("",)
    return [_plot_path(out, name, suffix) for suffix in suffixes for name in PLOTS]


def _save_and_close(fig, path: Path) -> None:
    """Save `fig` to `path` whole or not at all, and close it either way (pyplot keeps every open
    figure alive)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=path.suffix) as temp:
            fig.savefig(temp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def write_plots(report: dict, out: Path) -> list[Path]:
    """Write DIR/per_class_usage.png and DIR/kept_heads.png (plus the whole-network variants
    when the report has them); returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    written = []
    parts = [("", report, "final_block_usage", "final-block head usage (SAE on the last block)")]
    if report.get("whole_network"):
        parts.append(("_all", report["whole_network"], "head_usage", "whole-model head usage (SAE on every block)"))
    for suffix, part, key, title in parts:
        rows = part["per_class"]
        names = [str(r["class"]) for r in rows]
        x = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 3.6))
        ax.bar(x - 0.27, [r["unsteered"][key] for r in rows], 0.27, label="unsteered")
        ax.bar(x, [r["steered"][key] for r in rows], 0.27, label="per-class steering")
        if rows and rows[0].get("random"):
            ax.bar(x + 0.27, [r["random"][key] for r in rows], 0.27, label="random latents (control)")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("class (test images)")
        ax.set_ylabel("fraction of heads kept")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
        path = _plot_path(out, "per_class_usage", suffix)
        _save_and_close(fig, path)
        written.append(path)

        heads = report["model"]["heads"]
        fig, axes = plt.subplots(1, 2, figsize=(2 * (0.45 * heads + 2.2), 0.35 * len(rows) + 1.6), sharey=True)
        for ax, which in zip(axes, ("unsteered", "steered")):
            grid = np.zeros((len(rows), heads))
            for i, r in enumerate(rows):
                fractions = r[which].get("final_block_head_usage")
                if fractions:
                    grid[i] = fractions
                else:
                    for h in r[which]["kept_heads"] or []:
                        grid[i, h] = 1.0
                for h in r[which]["kept_heads"] or []:
                    ax.text(h, i, "*", ha="center", va="center", fontsize=9, color="white")
            image = ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(heads), [f"h{h}" for h in range(heads)])
            ax.set_yticks(range(len(rows)), names)
            ax.set_title(f"{which}")
            ax.set_xlabel("head of the final block")
        axes[0].set_ylabel("class")
        fig.colorbar(image, ax=list(axes), fraction=0.04, label="fraction of the class's test images keeping the head")
        fig.suptitle("final-block heads kept per class (* = kept by a majority)" + (" (every-block SAEs)" if suffix else ""),
                     fontsize=9)
        path = _plot_path(out, "kept_heads", suffix)
        _save_and_close(fig, path)
        written.append(path)
    return written
