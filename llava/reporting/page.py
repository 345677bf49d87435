"""Write a report: the figures (plots.py) of what sources.py collected, and an index.html that shows them."""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

from llava import storage
from llava.reporting import plots
from llava.reporting.sources import ReportData, collect

REPORT_DIR = "report"


def _figures(data: ReportData, out: Path) -> list[tuple[str, Path]]:
    """(caption, path) of every figure that has data to show."""
    made = [
        ("Training loss per stage", plots.per_stage(data.series, "loss", "loss", "loss", out / "loss.png", log=True)),
        ("Learning rate per stage", plots.per_stage(data.series, "lr", "learning rate", "lr", out / "lr.png")),
        (
            "Training throughput (real tokens per second, all workers)",
            plots.per_stage(data.series, "tokens_per_s", "tokens/s", "tokens/s", out / "tokens_per_s.png"),
        ),
        ("Evaluation accuracy", plots.accuracy_bars(data.accuracies, out / "accuracy.png")),
        ("Held-out digits: confusion matrix", plots.confusion(data.predictions, out / "confusion.png")),
        ("Held-out images and the model's answers", plots.answer_grid(data, out / "heldout_answers.png")),
    ]
    return [(caption, path) for caption, path in made if path is not None]


def _fact(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def _html(data: ReportData, figures: list[tuple[str, Path]]) -> str:
    facts = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fact(v)}</td></tr>"
        for k, v in {**{f"accuracy: {k}": v for k, v in data.accuracies.items()}, **data.facts}.items()
        if isinstance(v, (int, float, str))
    )
    sections = "".join(
        f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(caption)}"><figcaption>'
        f"{html.escape(caption)}</figcaption></figure>"
        for caption, path in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llava-ray report: {html.escape(data.root)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}} figure{{margin:1.2em 0}}
img{{max-width:100%;border:1px solid #ddd}} table{{border-collapse:collapse;font-size:0.9em}}
th,td{{border:1px solid #ddd;padding:2px 8px;text-align:left}}</style></head>
<body><h1>llava-ray report</h1><p>{html.escape(data.kind)}: <code>{html.escape(data.root)}</code></p>
{sections}<h2>Figures</h2><table>{facts}</table></body></html>
"""


def write_report(root: str, out: str | None = None) -> dict:
    """Report on `root` (pipeline root or run dir) into `out` (default <root>/report, local or s3://).
    Returns {"index": URI of index.html, "figures": [URIs]}."""
    out = out or storage.join(root, REPORT_DIR)
    data = collect(root)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(out) if not storage.is_s3(out) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        figures = _figures(data, local)
        (local / "index.html").write_text(_html(data, figures))
        if storage.is_s3(out):
            storage.upload_dir(str(local), out)
    return {"index": storage.join(out, "index.html"), "figures": [storage.join(out, p.name) for _, p in figures]}
