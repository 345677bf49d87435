"""Verified artifacts: checkpoints and exports list every file with its sha256 (llava/artifact_manifest.py),
loaders refuse a tampered, truncated, missing or planted file naming it, a re-export (local or S3) is never
served stale or mixed, and a training resume refuses a tampered DeepSpeed checkpoint before unpickling it."""

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava import storage
from llava.artifact_manifest import MANIFEST_FILE, ManifestError, NoManifestError, verify, write_manifest
from llava.run_format import ADAPTER_DIR, DS_DIR, DS_TAG, PROJECTOR_FILE


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_byte(file: Path, offset: int = -100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_checkpoint_lists_every_file_and_a_change_is_refused_naming_it(tiny_checkpoint, tmp_path):
    from llava.model import LlavaModel

    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    listed = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    assert sorted(listed) == on_disk and PROJECTOR_FILE in listed and "llm/model.safetensors" in listed
    assert verify(ckpt).keys() == set(listed)

    original = (ckpt / PROJECTOR_FILE).read_bytes()
    _flip_byte(ckpt / PROJECTOR_FILE)  # one byte of a tensor: still a valid safetensors file
    with pytest.raises(ManifestError, match=f"{PROJECTOR_FILE} was modified"):
        LlavaModel.from_pretrained(ckpt)
    (ckpt / PROJECTOR_FILE).write_bytes(original)

    weights = ckpt / "llm" / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])
    with pytest.raises(ManifestError, match=r"llm/model\.safetensors is truncated: \d+ bytes, the manifest says"):
        LlavaModel.from_pretrained(ckpt)
    weights.unlink()
    with pytest.raises(ManifestError, match=r"llm/model\.safetensors is listed in its manifest but missing"):
        verify(ckpt)
    weights.write_bytes(full)

    (ckpt / "llm" / "pytorch_model.bin").write_bytes(b"planted")  # a file no manifest lists
    with pytest.raises(ManifestError, match=r"llm/pytorch_model\.bin is not listed in its manifest"):
        LlavaModel.from_pretrained(ckpt)
    (ckpt / "llm" / "pytorch_model.bin").unlink()

    model = LlavaModel.from_pretrained(ckpt)  # restored: loads
    assert torch.equal(model.projector[0].weight, load_file(str(ckpt / PROJECTOR_FILE))["0.weight"])


def test_the_checksums_command_vouches_for_a_directory_then_names_a_changed_file(tmp_path, capsys):
    from jobs.cli import main

    foreign = tmp_path / "foreign"  # e.g. a checkpoint another tool wrote: no manifest yet
    (foreign / "sub").mkdir(parents=True)
    (foreign / "a.bin").write_bytes(b"a" * 100)
    (foreign / "sub" / "b.json").write_text("{}")
    assert main(["checksums", "write", str(foreign)]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"].endswith(MANIFEST_FILE)
    assert main(["checksums", "verify", str(foreign)]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "files": 2, "directory": str(foreign)}

    _flip_byte(foreign / "a.bin", offset=10)
    assert main(["checksums", "verify", str(foreign)]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and "a.bin was modified" in result["error"]


def test_a_checkpoint_without_manifest_loads_with_a_warning(tiny_checkpoint, tmp_path, caplog):
    from llava.model import LlavaModel

    ckpt = _copy(tiny_checkpoint, tmp_path / "old")
    (ckpt / MANIFEST_FILE).unlink()  # as written before manifests existed
    with pytest.raises(NoManifestError):
        verify(ckpt)
    with caplog.at_level(logging.WARNING, logger="llava.artifact_manifest"):
        LlavaModel.from_pretrained(ckpt)
    assert f"has no {MANIFEST_FILE}: its files are not verified" in caplog.text


def test_a_lora_adapter_loads_from_safetensors_only(base_models, tmp_path):
    from llava.config import ImageConfig, ModelConfig
    from llava.model import ADAPTER_WEIGHTS, LlavaModel
    from llava.training.config import LoraConfig
    from llava.training.lora import apply_lora

    model = LlavaModel.from_config(
        ModelConfig(vision_tower=base_models["vision_tower"], llm=base_models["llm"], image=ImageConfig(size=32))
    )
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ckpt = model.save_pretrained(tmp_path / "lora")
    adapter = ckpt / ADAPTER_DIR
    assert (adapter / ADAPTER_WEIGHTS).is_file() and not (adapter / "adapter_model.bin").exists()
    LlavaModel.from_pretrained(ckpt)  # merges

    torch.save(load_file(str(adapter / ADAPTER_WEIGHTS)), adapter / "adapter_model.bin")  # the pickled form
    (adapter / ADAPTER_WEIGHTS).unlink()
    write_manifest(ckpt)  # even a manifest that lists it does not make a pickled adapter acceptable
    with pytest.raises(FileNotFoundError, match=f"no {ADAPTER_WEIGHTS} \\(LoRA adapters load from safetensors only"):
        LlavaModel.from_pretrained(ckpt)


def _perturbed(model, seed: int):
    """`model` with different projector weights (same shapes, so every exported file keeps its size)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def test_reexport_to_the_same_directory_replaces_it_as_a_whole(tiny_checkpoint, tmp_path):
    from llava.export_hf import export_hf
    from llava.model_loading import load_checkpoint

    out = tmp_path / "export"
    a = _perturbed(load_checkpoint(tiny_checkpoint), 1)
    assert export_hf(a, out).format == "hf-llava"
    assert torch.equal(load_checkpoint(str(out)).projector[0].weight, a.projector[0].weight)
    b = _perturbed(load_checkpoint(tiny_checkpoint), 2)
    export_hf(b, out)
    assert torch.equal(load_checkpoint(str(out)).projector[0].weight, b.projector[0].weight)

    # another format into the same place: none of the HF export's files stay behind
    linear = load_checkpoint(tiny_checkpoint)
    linear.config.projector.type = "linear"
    assert export_hf(linear, out).format == "llava-ray"
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / PROJECTOR_FILE).is_file() and verify(out)

    stranger = tmp_path / "not-an-export"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(ManifestError, match="not empty and not a previous llava-ray artifact"):
        export_hf(b, stranger)
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_reexport_to_the_same_s3_uri_is_never_served_stale(tiny_checkpoint, s3_bucket, tmp_path, monkeypatch):
    from llava.export_hf import export_hf
    from llava.model_loading import load_checkpoint

    monkeypatch.setenv("LLAVA_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/export"
    a = _perturbed(load_checkpoint(tiny_checkpoint), 1)
    export_hf(a, uri)
    assert torch.equal(load_checkpoint(uri).projector[0].weight, a.projector[0].weight)  # now in the cache
    b = _perturbed(load_checkpoint(tiny_checkpoint), 2)
    export_hf(b, uri)  # every file the same size as before: a size-compared cache would serve a
    assert torch.equal(load_checkpoint(uri).projector[0].weight, b.projector[0].weight)

    cached = Path(storage.local_copy(uri))
    _flip_byte(cached / "model.safetensors")  # a damaged cache file is fetched again, not served
    assert torch.equal(load_checkpoint(uri).projector[0].weight, b.projector[0].weight)

    storage.write_text(f"{uri}/extra.bin", "planted")  # not listed: never downloaded
    assert not (Path(storage.local_copy(uri)) / "extra.bin").exists()

    storage.write_text(
        f"{uri}/{MANIFEST_FILE}", json.dumps({"format": "llava-ray-checksums/1", "complete": False, "files": {}})
    )  # as during a re-export
    with pytest.raises(storage.StorageError, match="being written"):
        load_checkpoint(uri)


class _Planted:
    """A pickle that creates a file when it is unpickled: the code a planted checkpoint file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_resume_from_a_tampered_deepspeed_checkpoint_is_refused_before_unpickling(base_models, ray_local, tmp_path):
    from llava.data.prepare import prepare_digits
    from llava.training.config import load_train_config
    from llava.training.trainer import train

    prepare_digits(str(tmp_path / "digits"))

    def run(max_steps: int):
        return train(
            load_train_config(
                "pretrain",
                preset="demo",
                overrides=[
                    f"model.vision_tower={base_models['vision_tower']}",
                    f"model.llm={base_models['llm']}",
                    f"data.train=[{tmp_path / 'digits' / 'stage1'}]",
                    f"checkpoint.storage_path={tmp_path / 'runs'}",
                    "checkpoint.run_name=tamper",
                    "checkpoint.max_failures=0",
                    "data.cache=false",
                    f"optim.max_steps={max_steps}",
                    "checkpoint.every_steps=2",
                ],
            )
        )

    first = run(2)
    checkpoint = Path(first.checkpoint)
    parts = sorted(p.name for p in checkpoint.glob("_checksums.rank*-of-*.json"))
    assert parts == ["_checksums.rank0-of-2.json", "_checksums.rank1-of-2.json"]  # one per training worker
    verify(checkpoint)

    victim = checkpoint / DS_DIR / DS_TAG / "mp_rank_00_model_states.pt"
    marker = tmp_path / "unpickled"
    victim.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(Exception, match=rf"{DS_DIR}/{DS_TAG}/mp_rank_00_model_states\.pt (is truncated|is larger|was)"):
        run(4)
    assert not marker.exists()  # refused before torch.load saw it
