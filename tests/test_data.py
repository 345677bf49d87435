"""Data on Ray Data: ingestion to parquet (local and a real S3 server), bad rows counted, reading for training."""

import io
import json
import os
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava import storage
from llava.data.digits import build_digits
from llava.data.ingest import IngestConfig
from llava.data.prepare import prepare_captions, prepare_digits, prepare_llava_json
from llava.data.schema import Manifest, shard_uris
from llava.data.sources import BRIEF_PROMPTS, InputError, caption_conversation


def png(color, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def read_dataset(uri):
    rows = []
    for shard in shard_uris(uri):
        fs, path = storage.filesystem(shard)
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    return {r["id"]: r for r in rows}


def turn(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def llava_fixture(images_uri):
    """(samples, image bytes by relative path, expected good ids, expected skipped counts)."""
    files = {
        "coco/train2017/a.jpg": jpeg("red"),
        "coco/train2017/b.png": png("blue"),
        "gqa/c.png": png("green"),
        "bad/corrupt.jpg": b"this is not an image at all",
        "bad/truncated.png": png("white", (64, 64))[:60],
        "bad/huge.png": png("black", (200, 200)),
    }
    for rel, data in files.items():
        storage.write_bytes(storage.join(images_uri, rel), data)
    samples = [
        {"id": "good-1", "image": "coco/train2017/a.jpg", "conversations": turn("<image>\nWhat color?", "Red.")},
        {
            "id": "good-2",
            "image": "coco/train2017/b.png",
            "conversations": turn("What color?\n<image>", "Blue.") + turn("Sure?", "Yes."),
        },
        {"id": "good-text", "conversations": turn("Tell me a joke.", "No.")},
        {
            "id": "good-multi",
            "image": ["gqa/c.png", "coco/train2017/a.jpg"],
            "conversations": turn("<image> vs <image>?", "Green, red."),
        },
        {"id": "missing", "image": "coco/train2017/none.jpg", "conversations": turn("<image>\nHi", "Hello.")},
        {"id": "corrupt", "image": "bad/corrupt.jpg", "conversations": turn("<image>\nHi", "Hello.")},
        {"id": "truncated", "image": "bad/truncated.png", "conversations": turn("<image>\nHi", "Hello.")},
        {"id": "bomb", "image": "bad/huge.png", "conversations": turn("<image>\nHi", "Hello.")},
        {"id": "no-turns", "image": "gqa/c.png", "conversations": []},
        {
            "id": "roles",
            "image": "gqa/c.png",
            "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "x"}],
        },
        {"id": "count", "image": "gqa/c.png", "conversations": turn("<image> and <image>?", "Two.")},
        "not a dict",
    ]
    good = {"good-1", "good-2", "good-text", "good-multi"}
    skipped = {
        "missing_image": 1,
        "image_undecodable": 1,
        "image_truncated": 1,
        "image_too_many_pixels": 1,
        "empty_conversation": 1,
        "bad_roles": 1,
        "image_count_mismatch": 1,
        "bad_conversation": 1,
    }
    return samples, files, good, skipped


def test_llava_json_from_and_to_s3_skips_and_counts_bad_rows(ray_local, s3_server, tmp_path):
    bucket = s3_server.make_bucket("llava-data")
    images_uri, out_uri = f"{bucket}/images", f"{bucket}/datasets/instruct"
    samples, files, good, skipped = llava_fixture(images_uri)
    storage.write_text(f"{bucket}/llava_instruct.json", json.dumps(samples))

    manifest = prepare_llava_json(
        f"{bucket}/llava_instruct.json", images_uri, out_uri, config=IngestConfig(max_pixels=30_000)
    )

    assert manifest.rows == len(good)
    assert manifest.skipped == skipped
    assert Manifest.read(out_uri).skipped == skipped
    rows = read_dataset(out_uri)  # read back from the bucket
    assert set(rows) == good
    by_id = {s["id"]: s for s in samples if isinstance(s, dict)}
    for sample_id, row in rows.items():
        assert json.loads(row["conversations"]) == by_id[sample_id]["conversations"]
        refs = by_id[sample_id].get("image")
        refs = [refs] if isinstance(refs, str) else (refs or [])
        assert (row["images"] or []) == [files[r] for r in refs]  # bytes round-trip exactly
        assert row["source"] == "llava_instruct"
    assert not [u for u in storage.list_files(out_uri) if "/staging/" in u]  # staging removed


def test_ray_data_reads_the_s3_dataset(ray_local, s3_server, base_models):
    import ray

    from llava.data.reader import model_ready_dataset

    bucket = s3_server.make_bucket("llava-read")
    samples, files, good, _ = llava_fixture(f"{bucket}/img")
    storage.write_text(f"{bucket}/d.json", json.dumps(samples))
    prepare_llava_json(f"{bucket}/d.json", f"{bucket}/img", f"{bucket}/out", config=IngestConfig(max_pixels=30_000))
    shards = shard_uris(f"{bucket}/out")  # the shards the manifest lists
    fs, _ = storage.filesystem(f"{bucket}/out")
    ds = ray.data.read_parquet([storage.filesystem(s)[1] for s in shards], filesystem=fs, columns=["id", "images"])
    assert sorted(r["id"] for r in ds.take_all()) == sorted(good)
    # the training reader reads the same shards from the bucket
    ready = model_ready_dataset([f"{bucket}/out"], digits_model_config(base_models), 16).take_all()
    assert {r["id"]: r["num_images"] for r in ready} == {"good-1": 1, "good-2": 1, "good-text": 0, "good-multi": 2}


def test_unusable_inputs_fail_fast_naming_the_uri(ray_local, s3_server, tmp_path):
    (tmp_path / "object.json").write_text(json.dumps({"data": []}))
    with pytest.raises(InputError, match="object.json.*JSON array"):
        prepare_llava_json(str(tmp_path / "object.json"), str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(storage.StorageError, match="no-such-bucket"):
        prepare_llava_json("s3://no-such-bucket/x.json", str(tmp_path), str(tmp_path / "out2"))


def test_caption_prompts_are_seeded_and_cover_all_eleven():
    conversations = [caption_conversation(str(i), "a cat", seed=7) for i in range(300)]
    assert conversations == [caption_conversation(str(i), "a cat", seed=7) for i in range(300)]
    assert conversations != [caption_conversation(str(i), "a cat", seed=8) for i in range(300)]
    questions = [c[0]["value"] for c in conversations]
    used = Counter(q.replace("<image>", "").strip() for q in questions)
    assert set(used) == set(BRIEF_PROMPTS)
    starts = sum(q.startswith("<image>\n") for q in questions)
    ends = sum(q.endswith("\n<image>") for q in questions)
    assert starts + ends == 300 and 90 < starts < 210
    assert all(c[1] == {"from": "gpt", "value": "a cat"} for c in conversations)


def test_prepare_captions_pipeline(ray_local, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pairs = []
    for i in range(40):
        (images / f"{i}.png").write_bytes(png((i * 5, 0, 0)))
        pairs.append({"image": f"{i}.png", "caption": f"a red square number {i}"})
    pairs.append({"image": "missing.png", "caption": "gone"})
    pairs.append({"image": "1.png", "caption": ""})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    first = prepare_captions(str(tmp_path / "pairs.jsonl"), str(images), str(tmp_path / "a"), seed=3)
    prepare_captions(str(tmp_path / "pairs.jsonl"), str(images), str(tmp_path / "b"), seed=3)
    assert first.rows == 40 and first.skipped == {"missing_image": 1, "bad_conversation": 1}
    a, b = read_dataset(str(tmp_path / "a")), read_dataset(str(tmp_path / "b"))
    assert {k: v["conversations"] for k, v in a.items()} == {k: v["conversations"] for k, v in b.items()}
    row = a["0.png"]
    assert json.loads(row["conversations"])[1]["value"] == "a red square number 0"
    assert row["images"] == [(images / "0.png").read_bytes()]


def test_digits_sizes_split_and_masks(tokenizer):
    from llava.tokenization import IGNORE_INDEX, tokenize_conversation

    splits = build_digits()
    assert {k: len(v) for k, v in splits.items()} == {"stage1": 1497, "stage2": 1497, "eval": 300}
    train_ids = {r["id"] for r in splits["stage1"]}
    assert train_ids == {r["id"] for r in splits["stage2"]}
    assert not train_ids & {r["id"] for r in splits["eval"]}
    assert build_digits()["eval"][0]["id"] == splits["eval"][0]["id"]  # the split is fixed
    for name, template in (("stage1", "plain"), ("stage2", "vicuna_v1"), ("eval", "vicuna_v1")):
        for row in splits[name]:
            conversation = json.loads(row["conversations"])
            sample = tokenize_conversation(conversation, tokenizer, template, 4, 512, num_images=1)
            trained = tokenizer.decode(
                [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
            )
            answers = [t["value"] for t in conversation if t["from"] == "gpt"]
            sep = "\n" if template == "plain" else "</s>"
            expected = (
                "".join(a + sep for a in answers) if template == "plain" else "".join(f" {a}{sep}" for a in answers)
            )
            assert trained == expected


def test_prepare_digits_writes_three_datasets(ray_local, tmp_path):
    manifests = prepare_digits(str(tmp_path / "digits"))
    assert {k: m.rows for k, m in manifests.items()} == {"stage1": 1497, "stage2": 1497, "eval": 300}
    assert all(m.skipped == {} for m in manifests.values())
    rows = read_dataset(str(tmp_path / "digits" / "eval"))
    assert Image.open(io.BytesIO(next(iter(rows.values()))["images"][0])).size == (32, 32)


@pytest.fixture(scope="module")
def digits_dir(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(str(out))
    return out


def digits_model_config(base_models, **overrides):
    from llava.config import ImageConfig, ModelConfig

    settings = {"template": "vicuna_v1", "image": ImageConfig(size=32), "max_length": 512, **overrides}
    return ModelConfig(vision_tower=base_models["vision_tower"], llm=base_models["llm"], **settings)


def test_model_ready_rows_match_the_core_library(digits_dir, base_models, tokenizer):
    import numpy as np
    import torch

    from llava.data.reader import collate, model_ready_dataset, row_pixel_values
    from llava.image_processing import load_pixel_values
    from llava.tokenization import tokenize_conversation

    config = digits_model_config(base_models)
    dataset = model_ready_dataset([str(digits_dir / "stage2")], config, 16).materialize()
    assert dataset.num_blocks() > 1  # preprocessing is spread over several tasks, not one per shard
    ready = {r["id"]: r for r in dataset.take_all()}
    stored = read_dataset(str(digits_dir / "stage2"))
    assert set(ready) == set(stored) and len(ready) == 1497
    sample_ids = list(stored)[:50]
    for sample_id in sample_ids:
        row, source = ready[sample_id], stored[sample_id]
        expected = tokenize_conversation(json.loads(source["conversations"]), tokenizer, "vicuna_v1", 16, 512, 1)
        assert list(row["input_ids"]) == expected.input_ids and list(row["labels"]) == expected.labels
        np.testing.assert_array_equal(
            row_pixel_values(row, 32)[0], load_pixel_values(source["images"][0], config.image)
        )
    # collate normalises the shipped uint8 pixels exactly like load_pixel_values does
    batch = collate([ready[i] for i in sample_ids[:8]], 0, 32)
    expected = np.stack([load_pixel_values(stored[i]["images"][0], config.image) for i in sample_ids[:8]])
    assert batch.pixel_values.dtype == torch.float32 and batch.pixel_values.shape == (8, 3, 32, 32)
    np.testing.assert_allclose(batch.pixel_values.numpy(), expected, rtol=0, atol=1e-6)


def test_collate_pads_and_normalises_with_each_rows_image_config():
    """No Ray: rows made by hand with two different ImageConfigs and a text-only row."""
    import numpy as np

    from llava.config import ImageConfig
    from llava.data.reader import collate
    from llava.image_processing import load_pixel_values, load_pixels_uint8

    data = [png((200, 30, 90), (40, 24)), jpeg("teal")]
    configs = [ImageConfig(size=16), ImageConfig(size=16, aspect="crop", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))]

    def row(i, length, images, config):
        pixels = np.stack([load_pixels_uint8(d, config) for d in images]).tobytes() if images else b""
        return {
            "id": f"r{i}",
            "input_ids": list(range(1, length + 1)),
            "labels": [-100] + list(range(2, length + 1)),
            "pixels_uint8": pixels,
            "pixel_mean": list(config.mean),
            "pixel_std": list(config.std),
            "num_images": len(images),
            "length": length,
        }

    rows = [row(0, 3, data, configs[0]), row(1, 5, [], configs[0]), row(2, 2, data[1:], configs[1])]
    batch = collate(rows, pad_token_id=7, image_size=16)
    assert batch.ids == ["r0", "r1", "r2"] and batch.real_tokens == 10 and batch.padded_tokens == 15
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 7], [1, 2, 3, 4, 5], [1, 2, 7, 7, 7]]
    assert batch.labels.tolist() == [[-100, 2, 3, -100, -100], [-100, 2, 3, 4, 5], [-100, 2, -100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    expected = np.stack(
        [
            load_pixel_values(data[0], configs[0]),
            load_pixel_values(data[1], configs[0]),
            load_pixel_values(data[1], configs[1]),
        ]
    )
    np.testing.assert_allclose(batch.pixel_values.numpy(), expected, rtol=0, atol=1e-6)
    assert collate(rows[1:2], 0, 16).pixel_values is None
    with pytest.raises(ValueError, match="image_size"):
        collate(rows, 0, 32)


def test_first_batch_needs_only_the_first_small_window():
    from llava.data.reader import LengthGroupedBatcher

    consumed = []

    def rows():
        for i in range(100):
            consumed.append(i)
            yield {
                "id": str(i),
                "input_ids": [1] * (1 + i % 7),
                "labels": [1] * (1 + i % 7),
                "pixels_uint8": b"",
                "pixel_mean": [0.5] * 3,
                "pixel_std": [0.5] * 3,
                "num_images": 0,
                "length": 1 + i % 7,
            }

    batcher = LengthGroupedBatcher(batch_size=4, pad_token_id=0, image_size=8, window_batches=8, seed=3)
    first = next(batcher.batches(rows()))
    assert len(first.ids) == 4 and len(consumed) == 8  # first window: 2 batches, not 8
    ids = [b.ids for b in LengthGroupedBatcher(4, 0, 8, window_batches=8, seed=3).batches(rows())]
    assert ids == [b.ids for b in LengthGroupedBatcher(4, 0, 8, window_batches=8, seed=3).batches(rows())]
    assert sorted(int(i) for batch in ids for i in batch) == list(range(100))


def test_reader_drops_and_counts_rows_it_cannot_use(digits_dir, base_models):
    import ray

    from llava.data.ingest import SkipCounter
    from llava.data.reader import model_ready_dataset

    counter = SkipCounter.remote(2)
    # 20 tokens cannot hold the system prompt, so no answer survives truncation in any row.
    rows = model_ready_dataset(
        [str(digits_dir / "eval")], digits_model_config(base_models, max_length=20), 16, counter
    ).take_all()
    skipped, examples = ray.get(counter.report.remote())
    assert rows == [] and skipped == {"too_long": 300}
    assert len(examples["too_long"]) == 2


def test_length_grouping_cuts_padding_and_keeps_every_row_once(digits_dir, base_models):
    from llava.data.reader import LengthGroupedBatcher, model_ready_dataset

    rows = model_ready_dataset([str(digits_dir / "stage2")], digits_model_config(base_models), 16).take_all()
    grouped = LengthGroupedBatcher(batch_size=8, pad_token_id=0, image_size=32, seed=1)
    plain = LengthGroupedBatcher(batch_size=8, pad_token_id=0, image_size=32, group_by_length=False)
    first = [b.ids for b in grouped.batches(rows, epoch=0)]
    list(plain.batches(rows))
    assert sorted(i for ids in first for i in ids) == sorted(r["id"] for r in rows)
    assert grouped.padding_fraction < plain.padding_fraction / 2
    assert first == [b.ids for b in LengthGroupedBatcher(8, 0, 32, seed=1).batches(rows, epoch=0)]
    assert first != [b.ids for b in LengthGroupedBatcher(8, 0, 32, seed=1).batches(rows, epoch=1)]
    batch = next(LengthGroupedBatcher(8, 0, 32, seed=1).batches(rows))
    assert batch.pixel_values.shape == (8, 3, 32, 32)
    assert (batch.labels[batch.attention_mask == 0] == -100).all()


def test_prepare_command_line(ray_local, tmp_path, capsys):
    from jobs.cli import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(png("red"))
    samples = [
        {"id": "1", "image": "x.png", "conversations": turn("<image>\nColor?", "Red.")},
        {"id": "2", "image": "x.png", "conversations": turn("Color?", "Red.")},
    ]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    code = main(
        [
            "prepare",
            "llava-json",
            "--json",
            str(tmp_path / "d.json"),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"]["rows"] == 1 and printed["out"]["skipped"] == {"image_count_mismatch": 1}


@pytest.mark.slow  # the prepare command in its own process, on a local Ray of its own
def test_prepare_captions_to_s3_with_an_explicit_endpoint(s3_server, tmp_path):
    """The installed CLI in a fresh process, told the endpoint only by --s3-endpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bucket = s3_server.make_bucket("captions-cli")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(png((0, i * 60, 0)))
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"{i}.png,a green square {i}\n" for i in range(3)))
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    exe = Path(sys.executable).parent / "llava-ray"
    result = subprocess.run(
        [
            str(exe),
            "prepare",
            "captions",
            "--pairs",
            str(tmp_path / "pairs.csv"),
            "--images",
            str(images),
            "--out",
            f"{bucket}/stage1",
            "--s3-endpoint",
            s3_server.endpoint,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["out"]["rows"] == 3
    assert Manifest.read(f"{bucket}/stage1").rows == 3


# ---- idempotent datasets: a whole new version or nothing, never appended to -----------------------------


def _attempt_dirs(out_uri):
    return sorted({u.split("/_attempts/")[1].split("/")[0] for u in storage.list_files(out_uri) if "/_attempts/" in u})


def _ids(out_uri):
    ids = []
    for shard in shard_uris(out_uri):
        fs, path = storage.filesystem(shard)
        ids += pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    return ids


def test_prepare_twice_refuses_then_replaces_with_the_same_rows(ray_local, tmp_path):
    from llava.data.publish import DatasetExistsError

    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"{i}.png").write_bytes(png((i * 20, 0, 0)))
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) for i in range(12))
    )
    out = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.parquet.txt").write_text("the user's own file")
    first = prepare_captions(str(tmp_path / "pairs.jsonl"), str(images), out)
    rows = read_dataset(out)
    assert first.rows == len(rows) == 12 and len(_attempt_dirs(out)) == 1

    with pytest.raises(DatasetExistsError, match="out: already holds a dataset \\(12 rows.*--overwrite"):
        prepare_captions(str(tmp_path / "pairs.jsonl"), str(images), out)
    second = prepare_captions(str(tmp_path / "pairs.jsonl"), str(images), out, overwrite=True)
    assert second.rows == 12 and sorted(_ids(out)) == sorted(rows)  # the same rows, once
    assert read_dataset(out) == rows
    assert _attempt_dirs(out) == [second.extra["attempt"]] != [first.extra["attempt"]]  # the old version is gone
    assert (tmp_path / "out" / "notes.parquet.txt").read_text() == "the user's own file"  # not ours: kept


def test_a_dataset_in_the_old_layout_is_replaced_not_mixed(ray_local, tmp_path):
    """Shards directly in the directory (before attempts existed) are read through their manifest, and a
    new version removes them."""
    import pyarrow as pa

    from llava.data.schema import SCHEMA

    out = tmp_path / "old"
    out.mkdir()
    row = {
        "id": "old-1",
        "images": None,
        "image_paths": None,
        "conversations": json.dumps(turn("Hi", "Hello.")),
        "source": "old",
    }
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), out / "part-0.parquet")
    Manifest(rows=1, skipped={}, sources=["x"], shards=["part-0.parquet"]).write(str(out))
    assert _ids(str(out)) == ["old-1"]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "new-1", "conversations": turn("Hey", "Yo.")}]))
    prepare_llava_json(str(tmp_path / "d.json"), str(tmp_path), str(out), overwrite=True)
    assert _ids(str(out)) == ["new-1"] and not (out / "part-0.parquet").exists()


def _blocking_captions(tmp_path):
    """Captions in 4 parquet files (4 Ray tasks), 10 rows each, ~200 KB images so that a 1 MB shard holds 5
    rows; the last row's image is a FIFO no one writes to: reading it blocks its task until the kill, while
    the other tasks write their shards."""
    import pyarrow as pa

    images = tmp_path / "images"
    images.mkdir()
    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))
    noise.save(images / "noise.png")
    os.mkfifo(images / "slow.png")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for f in range(4):
        rows = [
            {"id": f"{f}-{i}", "image": "slow.png" if (f, i) == (3, 9) else "noise.png", "caption": f"noise {f} {i}"}
            for i in range(10)
        ]
        pq.write_table(pa.Table.from_pylist(rows), pairs / f"part-{f}.parquet")
    return images, pairs


@pytest.mark.slow  # runs `llava-ray prepare` (its own Ray) twice per case
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_prepare_killed_mid_write_and_rerun_has_every_row_once(where, s3_server, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    images, pairs = _blocking_captions(tmp_path)
    out = str(tmp_path / "out") if where == "local" else s3_server.make_bucket() + "/data/captions"
    exe = Path(sys.executable).parent / "llava-ray"
    log = open(tmp_path / "prepare.log", "w+")
    command = [
        str(exe),
        "prepare",
        "captions",
        "--pairs",
        str(pairs),
        "--images",
        str(images),
        "--out",
        out,
        "--shard-mb",
        "1",
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def written_shards():
        try:
            return [u for u in storage.list_files(out, suffix=".parquet") if "/shards/" in u]
        except storage.StorageError:
            return []

    try:
        deadline = time.monotonic() + 600
        while not written_shards():
            assert proc.poll() is None, f"prepare exited early:\n{log.seek(0) or log.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no shard written:\n{log.seek(0) or log.read()[-3000:]}"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, like a lost machine
        proc.wait()
        try:  # release a reader still blocked on the FIFO, if any survived
            os.close(os.open(images / "slow.png", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    killed = _attempt_dirs(out)
    assert len(killed) == 1 and written_shards()  # shards were written ...
    assert not storage.exists(storage.join(out, "_manifest.json"))  # ... but never published
    with pytest.raises(FileNotFoundError):
        shard_uris(out)  # so no reader sees them

    os.remove(images / "slow.png")
    (images / "slow.png").write_bytes((images / "noise.png").read_bytes())
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=1200)  # no --overwrite needed
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = Manifest(**json.loads(rerun.stdout)["out"])
    ids = _ids(out)
    assert manifest.rows == len(ids) == 40 and len(set(ids)) == 40 and manifest.skipped == {}
    assert _attempt_dirs(out) == [manifest.extra["attempt"]] and killed[0] < manifest.extra["attempt"]


# ---- confined inputs: image paths stay under --images, reads are capped --------------------------------


def test_image_paths_must_stay_inside_the_images_root(tmp_path):
    from llava.data.image_refs import ImageAccess, ImageRefRejected

    root = str(tmp_path / "images")
    local = ImageAccess(root)
    assert local.resolve("coco/a.jpg") == f"{root}/coco/a.jpg"
    assert local.resolve("coco/../gqa/./b.png") == f"{root}/gqa/b.png"
    assert local.resolve(f"{root}/c.png") == f"{root}/c.png"  # absolute but inside
    s3 = ImageAccess("s3://bkt/images/")
    assert s3.resolve("coco/a.jpg") == "s3://bkt/images/coco/a.jpg"
    assert s3.resolve("s3://bkt/images/x/../y.png") == "s3://bkt/images/y.png"
    outside = [
        (local, "/etc/passwd"),
        (local, "/dev/zero"),
        (local, "../secret.png"),
        (local, "a/../../b.png"),
        (local, "s3://other/x.png"),
        (local, "~/x.png"),
        (local, f"{root}2/x.png"),
        (local, "."),
        (s3, "../x.png"),
        (s3, "s3://other-bucket/images/x.png"),
        (s3, "s3://bkt/images2/x.png"),
        (s3, "/etc/passwd"),
        (s3, "s3://bkt/images/../private/k.png"),
        (ImageAccess(None), "a.png"),
    ]
    for access, ref in outside:
        with pytest.raises(ImageRefRejected, match="^image_outside_root: ") as error:
            access.resolve(ref)
        assert error.value.reason == "image_outside_root", ref
    allowed = ImageAccess(root, allow_outside_root=True)
    assert allowed.resolve("/etc/passwd") == "/etc/passwd" and allowed.resolve("s3://o/x") == "s3://o/x"
    with pytest.raises(ImageRefRejected, match="image_too_large: /dev/zero: more than 1000 bytes"):
        ImageAccess(root, True, max_bytes=1000).read("/dev/zero")


def test_a_mixed_file_skips_only_the_rows_with_escaping_or_oversized_images(ray_local, s3_server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(png("red"))
    (images / "big.png").write_bytes(png("blue", (300, 300)) + b"\0" * 5000)  # over the 4000-byte cap
    (tmp_path / "secret.png").write_bytes(png("green"))
    bucket = s3_server.make_bucket()
    storage.write_bytes(f"{bucket}/elsewhere.png", png("white"))
    q = "<image>\nColor?"
    samples = [
        {"id": "ok", "image": "ok.png", "conversations": turn(q, "Red.")},
        {"id": "ok-text", "conversations": turn("Hi", "Hello.")},
        {"id": "abs", "image": str(tmp_path / "secret.png"), "conversations": turn(q, "Green.")},
        {"id": "dotdot", "image": "../secret.png", "conversations": turn(q, "Green.")},
        {"id": "zero", "image": "/dev/zero", "conversations": turn(q, "?")},
        {"id": "bucket", "image": f"{bucket}/elsewhere.png", "conversations": turn(q, "White.")},
        {"id": "multi", "image": ["ok.png", "../secret.png"], "conversations": turn("<image> <image>", "Two.")},
        {"id": "big", "image": "big.png", "conversations": turn(q, "Blue.")},
    ]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    config = IngestConfig(max_image_bytes=4000)
    confined = prepare_llava_json(str(tmp_path / "d.json"), str(images), str(tmp_path / "a"), config=config)
    assert set(read_dataset(str(tmp_path / "a"))) == {"ok", "ok-text"}
    assert confined.skipped == {"image_outside_root": 5, "image_too_large": 1}
    assert Manifest.read(str(tmp_path / "a")).skipped == confined.skipped

    # The explicit opt-out follows every path as given; /dev/zero still stops at the byte cap.
    from llava.data.image_refs import ImageAccess
    from llava.data.ingest import skip_reason, validate_row
    from llava.image_processing import ImageError
    from llava.templates import SampleRejected

    opened = ImageAccess(str(images), allow_outside_root=True, max_bytes=4000)
    outcome = {}
    for sample in samples:
        refs = sample.get("image")
        raw = {
            "id": sample["id"],
            "image_refs": [refs] if isinstance(refs, str) else refs,
            "images": None,
            "conversations": json.dumps(sample["conversations"]),
            "source": "d",
        }
        try:
            outcome[sample["id"]] = bool(validate_row(raw, opened, 64_000_000))
        except (SampleRejected, ImageError) as error:
            outcome[sample["id"]] = skip_reason(error)
    assert outcome == {
        "ok": True,
        "ok-text": True,
        "abs": True,
        "dotdot": True,
        "zero": "image_too_large",
        "bucket": True,
        "multi": True,
        "big": "image_too_large",
    }


def test_question_files_confine_image_paths_too(tmp_path):
    from llava.data.image_refs import ImageRefRejected
    from llava.inference.questions import jsonl_questions, question_images

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "a.png").write_bytes(png("red"))
    (tmp_path / "secret.png").write_bytes(png("green"))
    lines = [
        {"id": "ok", "text": "Color?", "image": "a.png"},
        {"id": "up", "text": "Color?", "image": "../secret.png"},
        {"id": "zero", "text": "Color?", "image": "/dev/zero"},
    ]
    (tmp_path / "q" / "questions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

    def outcomes(**kwargs):
        rows = jsonl_questions(str(tmp_path / "q" / "questions.jsonl"), **kwargs)
        result = {}
        for row in sorted(rows, key=lambda r: r["index"]):
            try:
                result[row["id"]] = len(question_images(row, max_bytes=1 << 20))
            except ImageRefRejected as error:
                result[row["id"]] = error.reason
        return result

    assert outcomes() == {"ok": 1, "up": "image_outside_root", "zero": "image_outside_root"}
    assert outcomes(allow_images_outside_root=True) == {"ok": 1, "up": 1, "zero": "image_too_large"}
