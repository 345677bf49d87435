"""The report's figures, drawn with matplotlib's object API on the Agg canvas (headless: no display, no pyplot)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from llava.reporting.sources import ReportData, Series

DPI = 80


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # a Figure without pyplot renders with Agg
    return path


def per_stage(series: list[Series], key: str, title: str, ylabel: str, path: Path, log: bool = False) -> Path | None:
    """One panel per stage that logged `key`, against its optimiser step."""
    shown = [s for s in series if s.values(key)[0]]
    if not shown:
        return None
    fig = Figure(figsize=(3.2 * len(shown), 2.8))
    for i, s in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        steps, values = s.values(key)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(s.name, fontsize=9)
        ax.set_xlabel("step")
        if i == 0:
            ax.set_ylabel(ylabel)
        if log and min(values) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def accuracy_bars(accuracies: dict[str, float], path: Path) -> Path | None:
    if not accuracies:
        return None
    fig = Figure(figsize=(1.4 + 1.3 * len(accuracies), 2.8))
    ax = fig.add_subplot()
    names = list(accuracies)
    bars = ax.bar(names, [accuracies[n] for n in names], color="tab:green")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title("evaluation", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def confusion(predictions: list[dict], path: Path) -> Path | None:
    """Reference digit (rows) x answered digit (columns, "other" for anything that is not one digit)."""
    refs = [p["reference"].strip() for p in predictions]
    if not refs or not all(r.isdigit() and len(r) == 1 for r in refs):
        return None
    matrix = np.zeros((10, 11), dtype=int)  # (reference, answer or other)
    for p, ref in zip(predictions, refs):
        answer = (p.get("answer") or "").strip()
        matrix[int(ref), int(answer) if answer.isdigit() and len(answer) == 1 else 10] += 1
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    for (r, c), n in np.ndenumerate(matrix):
        if n:
            ax.text(
                c, r, str(n), ha="center", va="center", fontsize=7, color="white" if n > matrix.max() / 2 else "black"
            )
    ax.set_xticks(range(11), [*map(str, range(10)), "other"], fontsize=8)
    ax.set_yticks(range(10), [str(d) for d in range(10)], fontsize=8)
    ax.set_xlabel("model's answer")
    ax.set_ylabel("reference")
    ax.set_title(f"held-out confusion ({np.trace(matrix)}/{matrix.sum()} correct)", fontsize=10)
    return _save(fig, path)


def answer_grid(data: ReportData, path: Path, count: int = 40, columns: int = 10) -> Path | None:
    """`count` held-out images with the model's answer (red: wrong, shown first; green: right)."""
    from PIL import Image

    def right(p: dict) -> bool:
        return (p.get("answer") or "").strip() == p["reference"].strip()

    shown = sorted((p for p in data.predictions if p["id"] in data.images), key=right)[:count]
    if not shown:
        return None
    rows = -(-len(shown) // columns)
    fig = Figure(figsize=(columns * 0.9, rows * 1.05))
    for i, p in enumerate(shown):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(np.asarray(Image.open(io.BytesIO(data.images[p["id"]])).convert("L")), cmap="gray")
        ax.set_title(repr((p.get("answer") or "")[:8]), fontsize=8, color="green" if right(p) else "red")
        ax.axis("off")
    return _save(fig, path)
