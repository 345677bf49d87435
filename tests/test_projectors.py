"""Tests for the vision -> LLM projector registry (llava/projectors.py, llava/qformer.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava.config import ProjectorConfig
from llava.projectors import build_projector, num_image_tokens

V, D = 16, 24  # vision width, LLM width
N_IMAGES, N_PATCHES = 3, 10


def _features(n_images: int = N_IMAGES, n_patches: int = N_PATCHES, dim: int = V) -> torch.Tensor:
    return torch.randn(n_images, n_patches, dim)  # (n_images, N, D_v)


@pytest.mark.parametrize("type_", ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"])
def test_patchwise_projector_shapes(type_):
    cfg = ProjectorConfig(type=type_)
    proj = build_projector(cfg, V, D)
    out = proj(_features())
    assert out.shape == (N_IMAGES, N_PATCHES, D)
    assert num_image_tokens(cfg, N_PATCHES) == N_PATCHES
    assert num_image_tokens(cfg, 576) == 576


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_mlp_depth_is_number_of_linears(depth):
    proj = build_projector(ProjectorConfig(type=f"mlp{depth}x_gelu"), V, D)
    assert type(proj) is nn.Sequential
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    gelus = [m for m in proj if isinstance(m, nn.GELU)]
    assert len(linears) == depth and len(gelus) == depth - 1
    assert len(proj) == 2 * depth - 1


def test_identity_shape_and_tokens():
    cfg = ProjectorConfig(type="identity")
    proj = build_projector(cfg, V, V)
    x = _features()
    out = proj(x)
    assert out.shape == (N_IMAGES, N_PATCHES, V)
    assert torch.equal(out, x)
    assert num_image_tokens(cfg, N_PATCHES) == N_PATCHES


def test_linear_is_plain_linear_and_param_count():
    proj = build_projector(ProjectorConfig(type="linear"), V, D)
    assert isinstance(proj, nn.Linear)
    assert sum(p.numel() for p in proj.parameters()) == V * D + D


def test_mlp2x_state_dict_keys_match_official_llava():
    proj = build_projector(ProjectorConfig(type="mlp2x_gelu"), V, D)
    assert set(proj.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert proj.state_dict()["0.weight"].shape == (D, V)
    assert proj.state_dict()["2.weight"].shape == (D, D)


def test_mlp2x_param_count():
    proj = build_projector(ProjectorConfig(type="mlp2x_gelu"), V, D)
    assert sum(p.numel() for p in proj.parameters()) == (V * D + D) + (D * D + D)


def test_mlp2x_matches_manual_linear_gelu_linear():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(type="mlp2x_gelu"), V, D)
    sd = proj.state_dict()
    x = _features()
    h = x @ sd["0.weight"].T + sd["0.bias"]
    h = 0.5 * h * (1.0 + torch.erf(h / 2**0.5))  # exact (erf) GELU, HF "gelu"
    expected = h @ sd["2.weight"].T + sd["2.bias"]
    torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_queries", [4, 7])
@pytest.mark.parametrize("n_patches", [1, 10, 33])
def test_qformer_shape_independent_of_patch_count(num_queries, n_patches):
    cfg = ProjectorConfig(type="qformer", num_queries=num_queries, qformer_layers=2, qformer_heads=4)
    proj = build_projector(cfg, V, D)
    out = proj(_features(n_patches=n_patches))
    assert out.shape == (N_IMAGES, num_queries, D)
    assert num_image_tokens(cfg, n_patches) == num_queries
    assert num_image_tokens(cfg, 576) == num_queries


def _qformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ProjectorConfig(type="qformer", num_queries=5, qformer_layers=2, qformer_heads=4)
    return build_projector(cfg, V, D).eval()


def test_qformer_gradients_reach_queries_and_features():
    proj = _qformer()
    x = _features().requires_grad_(True)
    proj(x).pow(2).sum().backward()
    assert proj.queries.grad is not None and proj.queries.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in proj.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_qformer_output_depends_on_features():
    proj = _qformer()
    x = _features()
    with torch.no_grad():
        a = proj(x)
        b = proj(x + torch.randn_like(x))
    assert not torch.allclose(a, b, atol=1e-4)


def test_qformer_images_are_independent():
    proj = _qformer()
    x = _features()
    with torch.no_grad():
        full = proj(x)
        single = proj(x[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


def test_qformer_is_permutation_invariant_over_patches():
    proj = _qformer()
    x = _features()
    perm = torch.randperm(x.shape[1])
    with torch.no_grad():
        a = proj(x)
        b = proj(x[:, perm])
    assert (a - b).abs().max().item() < 1e-5


def test_qformer_query_init():
    proj = build_projector(ProjectorConfig(type="qformer", num_queries=32, qformer_heads=4), 64, D)
    assert proj.queries.shape[-2:] == (32, 64)
    assert 0.01 < proj.queries.std().item() < 0.03


def test_identity_width_mismatch_raises():
    with pytest.raises(ValueError, match=rf"identity.*{V}.*{D}"):
        build_projector(ProjectorConfig(type="identity"), V, D)


@pytest.mark.parametrize("type_", ["mlp", "mlp2x_relu", "mlpx_gelu", "conv", "Linear", ""])
def test_unknown_type_raises_listing_valid_types(type_):
    with pytest.raises(ValueError, match="unknown projector type") as err:
        build_projector(ProjectorConfig(type=type_), V, D)
    for name in ("linear", "identity", "qformer", "mlp{N}x_gelu"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown projector type"):
        num_image_tokens(ProjectorConfig(type=type_), N_PATCHES)


def test_mlp0x_raises():
    with pytest.raises(ValueError, match="at least one linear"):
        build_projector(ProjectorConfig(type="mlp0x_gelu"), V, D)
    with pytest.raises(ValueError, match="at least one linear"):
        num_image_tokens(ProjectorConfig(type="mlp0x_gelu"), N_PATCHES)


def test_qformer_heads_must_divide_vision_width():
    with pytest.raises(ValueError, match=r"qformer_heads=5 must divide the vision width 16"):
        build_projector(ProjectorConfig(type="qformer", qformer_heads=5), V, D)


def test_qformer_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="positive"):
        build_projector(ProjectorConfig(type="qformer", num_queries=0, qformer_heads=4), V, D)
