"""`llava-ray report`: plots of a synthetic pipeline root and run dir, and the page in headless Chromium."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_digits

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
FIGURES = {"loss.png", "lr.png", "tokens_per_s.png", "accuracy.png", "confusion.png", "heldout_answers.png"}


def _metrics(steps: int, loss0: float) -> list[dict]:
    return [
        {"step": s, "loss": loss0 * math.exp(-s / steps), "lr": 1e-3 * (1 - s / steps), "tokens_per_s": 900.0 + s}
        for s in range(1, steps + 1)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def pipeline_root(tmp_path) -> Path:
    """A pipeline root as the demo leaves it: base-model histories, two runs, held-out predictions with images."""
    root = tmp_path / "demo"
    eval_data = write_digits(root / "data" / "eval", "eval", 12)
    rows = pq.read_table(Path(eval_data) / "part-0.parquet").to_pylist()
    predictions = []  # every fourth answer wrong
    for n, row in enumerate(rows):
        reference = json.loads(row["conversations"])[1]["value"]
        answer = reference if n % 4 else str((int(reference) + 1) % 10)
        predictions.append({"id": row["id"], "answer": answer, "reference": reference, "error": None})
    base = {}
    for component in ("vision", "llm"):
        (root / "base" / component).mkdir(parents=True)
        record = {"fingerprint": "x", "metrics": {"loss_start": 3.0, "loss_end": 1.0, "history": _metrics(30, 3.0)}}
        (root / "base" / component / "pretrain.json").write_text(json.dumps(record))
        base["vision_tower" if component == "vision" else "llm"] = str(root / "base" / component)
    stages = {
        "prepare": {"outputs": {"data": {"eval": eval_data}}},
        "base": {"outputs": {"base_models": base}},
        "stage1": {"outputs": {"run_dir": str(root / "runs/stage1")}, "metrics": {"loss_start": 0.8}},
        "stage2": {"outputs": {"run_dir": str(root / "runs/stage2")}, "metrics": {"loss_start": 0.5}},
        "eval": {
            "outputs": {"heldout_predictions": _write_jsonl(root / "eval/predictions.jsonl", predictions)},
            "metrics": {"heldout": {"accuracy": 0.75}, "stage1_captions": {"accuracy": 0.8}},
        },
    }
    _write_jsonl(root / "runs/stage1/metrics.jsonl", _metrics(12, 0.8))
    _write_jsonl(root / "runs/stage2/metrics.jsonl", _metrics(20, 0.5))
    (root / "pipeline.json").write_text(json.dumps({"stages": stages}))
    return root


def test_report_of_a_pipeline_writes_every_figure_and_a_page_that_shows_them(pipeline_root):
    from llava.reporting.page import write_report
    from llava.reporting.sources import collect

    data = collect(str(pipeline_root))
    assert [s.name for s in data.series] == ["base: CLIP", "base: LM", "stage1", "stage2"]
    assert data.accuracies == {"heldout": 0.75, "stage1_captions": 0.8} and len(data.images) == 12
    written = write_report(str(pipeline_root))
    out = pipeline_root / "report"
    assert {Path(f).name for f in written["figures"]} == FIGURES
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in FIGURES)
    page = Path(written["index"]).read_text()
    assert all(f'src="{name}"' in page for name in FIGURES)


def test_report_of_one_training_run(tmp_path):
    from jobs.cli import main

    _write_jsonl(tmp_path / "run" / "metrics.jsonl", _metrics(8, 1.0))
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"index.html", "loss.png", "lr.png", "tokens_per_s.png"}


@pytest.mark.slow  # a headless Chromium
def test_the_report_page_shows_every_image_in_chromium(pipeline_root):
    from llava.reporting.page import write_report

    have_browser = Path(CHROMIUM).exists()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not (have_browser and sync_playwright):
        if IN_CI:
            pytest.fail("CI is set but Chromium or playwright is missing (.ci/install installs both)")
        pytest.skip("needs Debian's chromium and the playwright package")
    index = write_report(str(pipeline_root))["index"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(Path(index).as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img",
                "imgs => imgs.map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}))",
            )
        finally:
            browser.close()
    assert {i["src"] for i in images} == FIGURES
    assert all(i["complete"] and i["width"] > 0 for i in images), images
