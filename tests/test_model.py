"""The LLaVA model on tiny offline base models: splicing, freeze policy, checkpoints."""

import pytest
import torch
from safetensors.torch import load_file

from llava.config import FreezeConfig, ImageConfig, ModelConfig, ProjectorConfig
from llava.freeze import apply_freeze, count_trainable, parameter_groups, resolve_trainable
from llava.model import LlavaModel
from llava.tokenization import tokenize_conversation

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat digit is this?"},
    {"from": "gpt", "value": "It is a seven."},
]
TWO_IMAGES = [
    {"from": "human", "value": "Compare <image> and <image>."},
    {"from": "gpt", "value": "They differ."},
]


def make_model(base_models, **overrides):
    config = ModelConfig(
        vision_tower=base_models["vision_tower"],
        llm=base_models["llm"],
        max_length=512,
        image=ImageConfig(size=32),
        **overrides,
    )
    torch.manual_seed(0)
    return LlavaModel.from_config(config)


def batch(model, conversation, n_images):
    sample = tokenize_conversation(
        conversation, model.tokenizer, model.config.template, model.num_image_tokens, 512, n_images
    )
    pixel_values = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return torch.tensor([sample.input_ids]), torch.tensor([sample.labels]), pixel_values


@pytest.fixture(scope="module")
def model(base_models):
    return make_model(base_models)


def test_image_tokens_follow_the_vision_grid(base_models):
    # 32 px / patch 8 = 4x4 = 16 patches; cls_patch keeps CLS too; qformer emits num_queries.
    assert make_model(base_models).num_image_tokens == 16
    assert make_model(base_models, select_feature="cls_patch").num_image_tokens == 17
    assert (
        make_model(
            base_models, projector=ProjectorConfig(type="qformer", num_queries=5, qformer_heads=4)
        ).num_image_tokens
        == 5
    )


def test_features_land_exactly_on_the_image_positions(model):
    input_ids, _, pixel_values = batch(model, TWO_IMAGES, 2)
    with torch.no_grad():
        embeds = model.embed(input_ids, pixel_values)[0]
        features = model.encode_images(pixel_values).reshape(-1, embeds.shape[-1])
        text = model.llm.get_input_embeddings()(input_ids)[0]
    is_image = input_ids[0] == model.image_token_id
    assert int(is_image.sum()) == 2 * model.num_image_tokens
    torch.testing.assert_close(embeds[is_image], features)  # in order: image 1 then image 2
    torch.testing.assert_close(embeds[~is_image], text[~is_image])


def test_select_layer_picks_the_penultimate_hidden_state(model):
    _, _, pixel_values = batch(model, CONVERSATION, 1)
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        expected = model.projector(hidden[-2][:, 1:])
        torch.testing.assert_close(model.encode_images(pixel_values), expected)
        assert not torch.allclose(model.projector(hidden[-1][:, 1:]), expected)


def test_image_count_mismatch_is_a_clear_error(model):
    input_ids, _, pixel_values = batch(model, TWO_IMAGES, 2)
    with pytest.raises(ValueError, match="image-token positions"):
        model.embed(input_ids, pixel_values[:1])


@pytest.mark.parametrize(
    "config, expected",
    [
        (FreezeConfig(preset="stage1"), {"vision": False, "projector": True, "llm": False}),
        (FreezeConfig(preset="stage2"), {"vision": False, "projector": True, "llm": True}),
        (FreezeConfig(preset="stage2", llm=False, vision=True), {"vision": True, "projector": True, "llm": False}),
    ],
)
def test_freeze_presets_and_overrides(model, config, expected):
    assert apply_freeze(model, config) == expected
    counts = count_trainable(model)
    totals = {
        "vision": sum(p.numel() for p in model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.projector.parameters()),
        "llm": sum(p.numel() for p in model.llm.parameters()),
    }
    assert counts == {name: totals[name] if on else 0 for name, on in expected.items()}


def test_bad_freeze_configs_are_refused():
    with pytest.raises(ValueError, match="unknown freeze preset"):
        resolve_trainable(FreezeConfig(preset="stage3"))
    with pytest.raises(ValueError, match="unknown component"):
        resolve_trainable(FreezeConfig(lr_multipliers={"lm": 2.0}))


def test_parameter_groups_scale_learning_rates(model):
    apply_freeze(model, FreezeConfig(preset="stage2"))
    groups = parameter_groups(model, 2e-5, FreezeConfig(preset="stage2", lr_multipliers={"projector": 10.0}))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"projector", "llm"}
    assert by_name["projector"]["lr"] == pytest.approx(2e-4)
    assert by_name["llm"]["lr"] == pytest.approx(2e-5)
    assert all(g["weight_decay"] == 0.0 for g in groups)


@pytest.mark.parametrize("preset", ["stage1", "stage2"])
def test_a_training_step_changes_only_trainable_parameters(base_models, preset):
    model = make_model(base_models)
    trainable = apply_freeze(model, FreezeConfig(preset=preset))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2, FreezeConfig(preset=preset)), weight_decay=0.0)
    input_ids, labels, pixel_values = batch(model, CONVERSATION, 1)
    loss = model(input_ids, pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefixes = {"vision": "vision_tower.", "projector": "projector.", "llm": "llm."}
    for component, prefix in prefixes.items():
        keys = {k for k in before if k.startswith(prefix)}
        if trainable[component]:
            assert changed & keys, f"{component} should have changed"
        else:
            assert not (changed & keys), f"{component} changed but is frozen: {sorted(changed & keys)[:3]}"
    assert torch.isfinite(loss)


def test_loss_ignores_masked_positions(model):
    input_ids, labels, pixel_values = batch(model, CONVERSATION, 1)
    with torch.no_grad():
        out = model(input_ids, pixel_values=pixel_values, labels=labels)
        logits = out.logits[0, :-1]
        targets = labels[0, 1:]
        keep = targets != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, manual)


def test_checkpoint_round_trip_gives_identical_logits(base_models, tmp_path):
    model = make_model(base_models)
    with torch.no_grad():
        model.projector[0].weight.add_(0.5)  # make it differ from a fresh init
    input_ids, _, pixel_values = batch(model, CONVERSATION, 1)
    for llm in (True, False):  # stage-1 checkpoints may hold only the projector
        path = model.save_pretrained(tmp_path / f"ckpt_llm_{llm}", llm=llm)
        assert (path / "llm").is_dir() == llm
        reloaded = LlavaModel.from_pretrained(path)
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(input_ids, pixel_values=pixel_values).logits,
                model(input_ids, pixel_values=pixel_values).logits,
            )


def test_pickle_weights_are_refused(base_models, tmp_path):
    """A directory holding only pytorch_model.bin (pickle) must not load: safetensors only."""
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(base_models["llm"], pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        LlavaModel.from_config(ModelConfig(vision_tower=base_models["vision_tower"], llm=str(pickled)))


def test_generate_returns_new_tokens(model):
    input_ids, labels, pixel_values = batch(model, CONVERSATION, 1)
    prompt = input_ids[:, : next(i for i, label in enumerate(labels[0].tolist()) if label != -100)]
    out = model.generate(prompt, pixel_values, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 4)
