"""Loading a model to answer with (serving, batch inference): our checkpoint, an HF export, local or S3."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from llava.model import LlavaModel

    return LlavaModel.from_pretrained(tiny_checkpoint).eval()


def _logits(model):
    pixels = torch.zeros(1, 3, 32, 32)
    ids = torch.tensor([[1, 5, *[model.image_token_id] * model.num_image_tokens, 7, 9]])
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits


def test_an_hf_export_loads_back_with_the_same_outputs_and_template(model, tmp_path):
    from llava.export_hf import export_hf
    from llava.model_loading import load_model

    export_hf(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llava"
    loaded = load_model(str(tmp_path / "export"))
    assert loaded.config.template == model.config.template and loaded.num_image_tokens == model.num_image_tokens
    assert torch.allclose(_logits(model), _logits(loaded), atol=1e-5)


def test_a_checkpoint_in_s3_loads_with_the_same_outputs(model, tiny_checkpoint, s3_bucket):
    from llava import storage
    from llava.model_loading import load_model

    storage.upload_dir(tiny_checkpoint, f"{s3_bucket}/model")
    loaded = load_model(f"{s3_bucket}/model")
    assert torch.allclose(_logits(model), _logits(loaded), atol=1e-6)


def test_an_hf_export_without_readable_weights_is_refused(model, tmp_path):
    from llava.artifact_manifest import MANIFEST_FILE
    from llava.checkpoint_import import CheckpointError
    from llava.export_hf import export_hf
    from llava.model_loading import load_model

    export_hf(model, tmp_path / "export")
    (tmp_path / "export" / MANIFEST_FILE).unlink()  # as a llava-hf directory from elsewhere: no checksum manifest
    (tmp_path / "export" / "model.safetensors").rename(tmp_path / "export" / "pytorch_model.bin")  # no pickle inside
    with pytest.raises(CheckpointError, match=r"refused .*pytorch_model\.bin: not a plain-tensor torch checkpoint"):
        load_model(str(tmp_path / "export"))
    (tmp_path / "export" / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_model(str(tmp_path / "export"))
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(str(tmp_path / "nowhere"))
