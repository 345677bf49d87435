"""Data-loading throughput: our Ray Data path vs. the official LLaVA-style torch DataLoader.

    python benchmarks/data_loading.py [--rows N] [--batch-size B] [--out-dir DIR] [--ray-cpus C] [--rows-per-block R]

Both paths read the *same* synthetic LLaVA-JSON dataset (N rows, JPEGs of varied sizes,
1-4 turn conversations, ~10% text-only rows) on the same machine, and both turn every row
into exactly the same tensors: images go through `llava.image_processing.load_pixel_values`
(ImageConfig(size=224), aspect=pad) and conversations through
`llava.tokenization.tokenize_conversation` (vicuna_v1, max_length 2048, 256 image tokens
per image, as CLIP-L/14 at 224 px gives). Only the data path is measured: no vision tower
or LLM is run (the tiny offline base models only supply the tokenizer).

(a) ours      LLaVA JSON --prepare_llava_json--> parquet (timed separately, once), then per epoch
              model_ready_dataset(...).iter_rows() -> LengthGroupedBatcher(...).batches() -> Batch
              (preprocessing in Ray Data tasks over blocks of --rows-per-block rows; uint8 pixels
              through the object store, normalised to float32 in collate).
(b) official  json.load the whole JSON; torch Dataset whose __getitem__ reads the image file,
              preprocesses and tokenises it; DataLoader(batch_size=B, shuffle=True,
              num_workers=2 and 0) with a collate that pads to the batch max (no length grouping).

Each path is warmed up first (ours: one whole untimed epoch, so the Ray worker processes have
imported torch/transformers and cached the tokenizer; the DataLoader: a few batches, its workers
are forked from an already warm process; the OS page cache is warm for both), then one epoch is
timed end to end, including per-epoch start-up (Ray Data planning and task launch / DataLoader
worker fork).

How cores are counted:
  "cores"          the CPU cores the path may use: min(os.cpu_count(), Ray's num_cpus) for ours
                   (the driver, which iterates and collates, shares them), and
                   min(os.cpu_count(), max(1, num_workers)) for the DataLoader.
  "CPU-seconds"    measured user+system CPU time of every process involved: for ours the
                   driver plus all its descendants (gcs, raylet, Ray workers); for the
                   DataLoader the main process plus its (reaped) worker processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HOME": str(ROOT / ".cache" / "huggingface"),
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from llava.config import ImageConfig, ModelConfig  # noqa: E402
from llava.image_processing import load_pixel_values  # noqa: E402
from llava.tokenization import IGNORE_INDEX, prepare_tokenizer, tokenize_conversation  # noqa: E402

NUM_IMAGE_TOKENS = 256  # CLIP-L/14 at 224 px: (224/14)^2 patches
IMAGE_SIZE = 224
DATA_VERSION = 1  # bump when the synthetic data generator changes

WORDS = """the quick brown fox jumps over lazy dog a picture of cat sitting on red sofa what is shown in image
describe concisely provide brief description given digit zero one two three four five six seven eight nine
number even odd comes next man riding bicycle down city street next to tall buildings and parked cars dogs
playing with frisbee green grass park sunny day answer option letter from choices directly question how many
people are photo there plate food rice vegetables chicken wooden table assistant gives helpful detailed polite
answers user questions window blue sky clouds tree house car bus train boat water river mountain snow""".split()
QUESTIONS = [
    "What is shown in the image?",
    "Describe the image concisely.",
    "How many people are in the photo?",
    "Provide a brief description of the given image.",
    "What color is the sofa?",
    "Is the number even or odd?",
]


# --- synthetic data --------------------------------------------------------------------------------------------------


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _answer(rng: random.Random) -> str:
    n = int(math.exp(rng.uniform(math.log(4), math.log(140))))  # log-uniform 4..140 words
    out, left = [], n
    while left > 0:
        k = min(left, rng.randint(6, 16))
        out.append(_sentence(rng, k))
        left -= k
    return " ".join(out)


def _conversation(rng: random.Random, with_image: bool) -> list[dict]:
    turns = []
    for t in range(rng.randint(1, 4)):
        question = rng.choice(QUESTIONS) if rng.random() < 0.6 else _sentence(rng, rng.randint(4, 20)).rstrip(".") + "?"
        if t == 0 and with_image:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": _answer(rng)}]
    return turns


def _image(rng: np.random.Generator, noise: np.ndarray) -> Image.Image:
    """A JPEG-unfriendly picture: colour gradient + random shapes + a crop of a fixed noise field."""
    w, h = (int(v) for v in rng.integers(200, 641, size=2))
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(c0 + (c1 - c0) * ramp, (h, w, 3))
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    oy, ox = int(rng.integers(0, noise.shape[0] - h)), int(rng.integers(0, noise.shape[1] - w))
    pixels = np.asarray(image, dtype=np.int16) + noise[oy : oy + h, ox : ox + w]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_dataset(data_dir: Path, rows: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """data_dir/llava.json + data_dir/images/; reused when already built with the same parameters."""
    json_path, images_dir, meta_path = data_dir / "llava.json", data_dir / "images", data_dir / "meta.json"
    want = {"rows": rows, "seed": seed, "version": DATA_VERSION}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == want:
        meta = json.loads(meta_path.read_text())
        meta["reused"] = True
        return json_path, images_dir, meta
    shutil.rmtree(data_dir, ignore_errors=True)
    (images_dir / "imgs").mkdir(parents=True)
    start = time.perf_counter()
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    noise = nrng.normal(0, 14, size=(700, 700, 3)).astype(np.int16)
    items, image_bytes, n_images = [], 0, 0
    for i in range(rows):
        with_image = rng.random() >= 0.10
        item = {"id": f"syn-{i:06d}", "conversations": _conversation(rng, with_image)}
        if with_image:
            ref = f"imgs/{i:06d}.jpg"
            _image(nrng, noise).save(images_dir / ref, format="JPEG", quality=90)
            image_bytes += (images_dir / ref).stat().st_size
            n_images += 1
            item["image"] = ref
        items.append(item)
    json_path.write_text(json.dumps(items))
    meta = {
        "params": want,
        "images": n_images,
        "image_mb": image_bytes / 1e6,
        "json_mb": json_path.stat().st_size / 1e6,
        "seconds": time.perf_counter() - start,
    }
    meta_path.write_text(json.dumps(meta))
    meta["reused"] = False
    return json_path, images_dir, meta


# --- CPU accounting --------------------------------------------------------------------------------------------------


class TreeCpu:
    """User+system CPU seconds of this process and all its live descendants (Ray's gcs, raylet, workers)."""

    def __init__(self):
        self.me = psutil.Process()

    def snapshot(self) -> dict[tuple, float]:
        out = {}
        for proc in [self.me] + self.me.children(recursive=True):
            try:
                t = proc.cpu_times()
                name = "driver" if proc.pid == self.me.pid else proc.name()
                out[(proc.pid, proc.create_time(), name)] = t.user + t.system
            except psutil.Error:
                pass
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items())

    @staticmethod
    def by_name(before: dict, after: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, v in after.items():
            out[key[2]] = out.get(key[2], 0.0) + v - before.get(key, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def own_and_reaped_children_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- (a) ours --------------------------------------------------------------------------------------------------------


def run_ours(shards: str, model_config: ModelConfig, batch_size: int, pad_id: int, rows_per_block=None) -> dict:
    from llava.data.reader import LengthGroupedBatcher, model_ready_dataset

    def epoch() -> dict:
        batcher = LengthGroupedBatcher(batch_size=batch_size, pad_token_id=pad_id, image_size=IMAGE_SIZE, seed=0)
        start = time.perf_counter()
        ds = model_ready_dataset([shards], model_config, NUM_IMAGE_TOKENS, rows_per_block=rows_per_block)
        first, rows, batches, real = None, 0, 0, 0
        driver_cpu = time.process_time()
        pull = 0.0  # time spent waiting on Ray Data for the next row
        it = iter(ds.iter_rows())

        def timed_rows():
            nonlocal pull
            while True:
                t0 = time.perf_counter()
                try:
                    row = next(it)
                except StopIteration:
                    pull += time.perf_counter() - t0
                    return
                pull += time.perf_counter() - t0
                yield row

        for batch in batcher.batches(timed_rows()):
            if first is None:
                first = time.perf_counter() - start
            rows += len(batch.ids)
            batches += 1
            real += batch.real_tokens
        seconds = time.perf_counter() - start
        return {
            "dataset": ds,
            "seconds": seconds,
            "first_batch_s": first,
            "rows": rows,
            "batches": batches,
            "real_tokens": real,
            "padding": batcher.padding_fraction,
            "wait_s": pull,
            "driver_cpu_s": time.process_time() - driver_cpu,
        }

    # Warm-up: one whole epoch. A shorter pass (ds.limit) leaves the worker that gets the next epoch's map task
    # cold: importing torch/transformers and loading the tokenizer there costs ~4 CPU-seconds, once per process.
    warmup = epoch()
    cpu = TreeCpu()
    before = cpu.snapshot()
    result = epoch()
    after = cpu.snapshot()  # before ds.stats(), which itself costs CPU in Ray's stats actor
    result["operators"] = [
        line.strip() for line in result.pop("dataset").stats().splitlines() if "tasks executed" in line
    ]
    result["cpu_s"] = TreeCpu.delta(before, after)
    result["cpu_by_process"] = TreeCpu.by_name(before, after)
    result["warmup_s"] = warmup["seconds"]
    return result


# --- (b) the official kind -------------------------------------------------------------------------------------------


class LazySupervisedDataset(torch.utils.data.Dataset):
    """Like LLaVA's train.py LazySupervisedDataset: the whole JSON in memory, images read per item."""

    def __init__(self, json_path: Path, images_dir: Path, tokenizer, model_config: ModelConfig):
        with open(json_path) as f:
            self.items = json.load(f)
        self.images_dir = images_dir
        self.tokenizer = tokenizer
        self.config = model_config

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        n_images = 1 if "image" in item else 0
        sample = tokenize_conversation(
            item["conversations"],
            self.tokenizer,
            self.config.template,
            NUM_IMAGE_TOKENS,
            self.config.max_length,
            n_images,
        )
        pixels = None
        if sample.num_images:
            # The official code does Image.open(path).convert("RGB") + its processor; we read the file's bytes and
            # decode them with PIL inside load_pixel_values so the preprocessing is identical to ours.
            with open(self.images_dir / item["image"], "rb") as f:
                data = f.read()
            pixels = torch.from_numpy(load_pixel_values(data, self.config.image))
        return {
            "id": item["id"],
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": pixels,
        }


class PadCollator:
    """DataCollatorForSupervisedDataset: right-pad to the batch max; images concatenated."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, instances: list[dict]) -> dict:
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [x["input_ids"] for x in instances], batch_first=True, padding_value=self.pad_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [x["labels"] for x in instances], batch_first=True, padding_value=IGNORE_INDEX
        )
        lengths = torch.tensor([len(x["input_ids"]) for x in instances])
        attention = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        images = [x["pixel_values"][None] for x in instances if x["pixel_values"] is not None]
        return {
            "ids": [x["id"] for x in instances],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "pixel_values": torch.cat(images) if images else None,
            "real_tokens": int(lengths.sum()),
            "padded_tokens": int(input_ids.numel()),
        }


def run_official(
    dataset: LazySupervisedDataset, batch_size: int, pad_id: int, num_workers: int, warmup_batches: int
) -> dict:
    def loader(seed: int):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=PadCollator(pad_id),
            generator=torch.Generator().manual_seed(seed),
        )

    for i, _ in enumerate(loader(1)):  # warm-up
        if i + 1 >= warmup_batches:
            break
    cpu_before = own_and_reaped_children_cpu()
    start = time.perf_counter()
    first, rows, batches, real, padded = None, 0, 0, 0, 0
    it = iter(loader(0))
    for batch in it:
        if first is None:
            first = time.perf_counter() - start
        rows += len(batch["ids"])
        batches += 1
        real += batch["real_tokens"]
        padded += batch["padded_tokens"]
    seconds = time.perf_counter() - start
    del it  # workers joined (reaped) -> their CPU time shows up in os.times().children_*
    return {
        "seconds": seconds,
        "first_batch_s": first,
        "rows": rows,
        "batches": batches,
        "real_tokens": real,
        "padding": 1 - real / padded,
        "cpu_s": own_and_reaped_children_cpu() - cpu_before,
    }


# --- report ----------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def table(ours: dict, official: list[tuple[str, dict]]) -> str:
    metrics = [
        ("rows", lambda r: r["rows"], 0),
        ("batches", lambda r: r["batches"], 0),
        ("epoch seconds (incl. start-up)", lambda r: r["seconds"], 2),
        ("time to first batch, s", lambda r: r["first_batch_s"], 2),
        ("rows/s", lambda r: r["rows"] / r["seconds"], 1),
        ("cores counted", lambda r: r["cores"], 0),
        ("rows/s per core", lambda r: r["rows"] / r["seconds"] / r["cores"], 1),
        ("CPU-seconds used (measured)", lambda r: r["cpu_s"], 1),
        ("rows per CPU-second", lambda r: r["rows"] / r["cpu_s"], 1),
        ("padding fraction", lambda r: r["padding"], 3),
    ]
    head = ["metric", "ours (Ray Data + LengthGroupedBatcher)"]
    for name, _ in official:
        head += [name, f"ours / {name.split(' ', 1)[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, fn, digits in metrics:
        mine = fn(ours)
        cells = [label, _fmt(int(mine) if digits == 0 else float(mine), digits)]
        for _, res in official:
            theirs = fn(res)
            cells.append(_fmt(int(theirs) if digits == 0 else float(theirs), digits))
            cells.append(
                f"{mine / theirs:.2f}x" if theirs and label not in ("rows", "batches", "cores counted") else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="synthetic LLaVA-JSON samples (default 2000)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="rows per batch (default 16, LLaVA's per-device size)"
    )
    parser.add_argument(
        "--out-dir",
        default=str(ROOT / ".cache" / "benchmarks" / "data_loading"),
        help="where data, parquet and the tiny base models go (default .cache/benchmarks/data_loading)",
    )
    parser.add_argument(
        "--ray-cpus", type=int, default=os.cpu_count(), help="num_cpus for init_ray (default: all cores)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader num_workers for the main comparison (default 2)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads in this process (default 0: leave torch's default)",
    )
    parser.add_argument(
        "--rows-per-block",
        type=int,
        default=None,
        help="ours: rows per Ray Data block, i.e. per preprocessing task (default: the reader's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import logging

    import PIL
    import pyarrow
    import ray
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nproc = os.cpu_count() or 1
    print("## Data-loading benchmark: ours (Ray Data) vs. official-style torch DataLoader\n")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {nproc} CPU cores (os.cpu_count), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"pyarrow {pyarrow.__version__}, transformers {transformers.__version__}, pillow {PIL.__version__}, "
        f"numpy {np.__version__}"
    )
    print(
        f"settings: rows={args.rows} batch_size={args.batch_size} image_size={IMAGE_SIZE} (aspect=pad) "
        f"num_image_tokens={NUM_IMAGE_TOKENS} template=vicuna_v1 max_length=2048 ray_cpus={args.ray_cpus} "
        f"torch_threads(main process)={torch.get_num_threads()} rows_per_block={args.rows_per_block or 'default'}; "
        "no model is run (data path only)\n"
    )

    # Tiny offline base models: only the tokenizer is used.
    base = out / "base"
    if not (base / "llm" / "tokenizer.json").exists():
        from llava.tiny_models import build_tiny_base_models

        build_tiny_base_models(base)
    model_config = ModelConfig(
        vision_tower=str(base / "vision"),
        llm=str(base / "llm"),
        template="vicuna_v1",
        image=ImageConfig(size=IMAGE_SIZE),
        max_length=2048,
    )
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_config.tokenizer_path), model_config.template)
    pad_id = tokenizer.pad_token_id

    json_path, images_dir, meta = make_dataset(out / "data", args.rows, args.seed)
    print(
        f"data: {args.rows} samples, {meta['images']} JPEGs ({meta['image_mb']:.1f} MB, 200-640 px per side), "
        f"JSON {meta['json_mb']:.1f} MB; "
        + ("reused from a previous run" if meta["reused"] else f"generated in {meta['seconds']:.1f}s")
    )

    # (a) ours: ingest once, then time the model-ready path.
    import ray.data

    from llava.data.prepare import prepare_llava_json
    from llava.ray_runtime import init_ray

    for name in ("ray", "ray.data"):  # after `import ray.data`, which configures its loggers
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    t0 = time.perf_counter()
    init_ray(num_cpus=args.ray_cpus)
    ray_start = time.perf_counter() - t0
    parquet = out / "parquet"
    shutil.rmtree(parquet, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = prepare_llava_json(str(json_path), str(images_dir), str(parquet))
    ingest_s = time.perf_counter() - t0
    shard_mb = sum(p.stat().st_size for p in parquet.rglob("*.parquet")) / 1e6
    print(f"ray: started in {ray_start:.1f}s with num_cpus={args.ray_cpus}")
    print(
        f"ingestion (prepare_llava_json, once, not in the throughput): {ingest_s:.1f}s for {manifest.rows} rows "
        f"-> {len(manifest.shards)} shard(s), {shard_mb:.1f} MB; skipped {manifest.skipped or 'none'}"
    )

    ours = run_ours(str(parquet), model_config, args.batch_size, pad_id, args.rows_per_block)
    ours["cores"] = min(nproc, args.ray_cpus)
    ray.shutdown()  # no idle Ray processes while the DataLoader is timed

    # (b) the official kind.
    dataset = LazySupervisedDataset(json_path, images_dir, tokenizer, model_config)
    official = []
    for workers in dict.fromkeys([args.workers, 0]):
        res = run_official(dataset, args.batch_size, pad_id, workers, warmup_batches=4)
        res["cores"] = min(nproc, max(1, workers))
        official.append((f"official num_workers={workers}", res))

    print(
        f"\ncores counted: ours = min(os.cpu_count()={nproc}, Ray num_cpus={args.ray_cpus}) (the driver, which "
        "iterates and collates, shares them); official = min(os.cpu_count(), max(1, num_workers)). "
        "CPU-seconds: measured user+system time of all processes involved (ours: driver + gcs/raylet/Ray workers; "
        "official: main process + its DataLoader workers)."
    )
    print(f"ours: warm-up epoch (cold Ray workers) took {ours['warmup_s']:.1f}s, not counted")
    print(
        f"ours: {ours['wait_s']:.1f}s of the {ours['seconds']:.1f}s epoch were spent waiting on Ray Data for the next "
        f"row; the driver process (iteration + LengthGroupedBatcher collate + Ray Data's executor thread) used "
        f"{ours['driver_cpu_s']:.1f} CPU-seconds of the {ours['cpu_s']:.1f} total"
    )
    print(
        "ours, CPU-seconds by process (timed epoch): "
        + ", ".join(f"{name} {sec:.1f}" for name, sec in ours["cpu_by_process"].items() if sec >= 0.05)
    )
    print("ours, Ray Data operators (timed epoch): " + "; ".join(ours["operators"]))
    load = os.getloadavg()[0]
    print(
        f"load average at the end: {load:.2f}"
        + (
            f"  WARNING: above the {nproc} cores, other processes competed for the CPUs and the timings are noisy"
            if load > nproc
            else ""
        )
    )
    same = all(r["rows"] == ours["rows"] and r["real_tokens"] == ours["real_tokens"] for _, r in official)
    print(
        f"check: both paths produced {ours['rows']} rows and {ours['real_tokens']:,} real tokens"
        if same
        else f"WARNING: the paths disagree: ours {ours['rows']} rows / {ours['real_tokens']} tokens, "
        f"official {[(r['rows'], r['real_tokens']) for _, r in official]}"
    )
    print(
        "padding: ours groups by (modality, length) in windows of 16 batches (the first windows 2, 4, 8 batches, "
        "so the first batch comes early); the official DataLoader here "
        "shuffles without grouping (LLaVA's default unless group_by_modality_length=True).\n"
    )
    print(table(ours, official))


if __name__ == "__main__":
    main()
