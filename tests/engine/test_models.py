"""Model protocol: shapes for every family, label handling, registry lookups, config round trip."""

from __future__ import annotations

import pytest
import torch

from engine.models import build_model, config_from_dict, config_to_dict, model_from_config
from engine.models.registry import list_presets, make_config

IMAGE_CASES = [
    ("mlp", {}),
    ("mlp", {"hidden_dims": (64, 32), "latent_dim": 5, "image_size": 32}),
    ("cvae-mlp", {"hidden_dims": (64,)}),
    ("conv", {"hidden_dims": (8, 16, 32, 64)}),
    ("conv", {"hidden_dims": (8, 16), "image_size": 32, "in_channels": 3}),
    ("conv", {"hidden_dims": (8, 16, 32, 64), "image_size": 64, "in_channels": 3}),
    ("cvae-conv", {"hidden_dims": (8, 16)}),
]


def labels_for(model, n: int):
    return torch.randint(model.config.num_classes, (n,)) if model.conditional else None


@pytest.mark.parametrize(("family", "overrides"), IMAGE_CASES)
def test_image_vae_protocol_shapes(family, overrides):
    model = build_model(family, **overrides)
    batch = 3
    x = torch.rand(batch, *model.data_shape)
    y = labels_for(model, batch)
    post = model.encode(x, y)
    assert post.mean.shape == (batch, *model.latent_shape) == post.logvar.shape
    assert model.decode(post.mean, y).shape == x.shape
    out = model(x, y)
    assert out.recon_logits.shape == x.shape and out.kl.shape == (batch,)
    samples = model.sample(5, labels_for(model, 5), seed=3)
    assert samples.shape == (5, *model.data_shape) and 0 <= samples.min() <= samples.max() <= 1
    assert model.reconstruct(x, y).shape == x.shape


def test_sample_is_reproducible_by_seed():
    model = build_model("mlp").eval()
    assert torch.equal(model.sample(4, seed=11), model.sample(4, seed=11))
    assert not torch.equal(model.sample(4, seed=11), model.sample(4, seed=12))


def test_kl_of_forward_matches_closed_form():
    model = build_model("mlp", hidden_dims=(32,), latent_dim=7)
    x = torch.rand(6, 1, 28, 28)
    out = model(x)
    mu, logvar = out.posterior.mean.double(), out.posterior.logvar.double()
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(out.kl.double(), expected, rtol=1e-5, atol=1e-5)


def test_conditional_decoder_uses_the_label():
    model = build_model("cvae-mlp", hidden_dims=(32,)).eval()
    z = torch.randn(1, model.config.latent_dim).expand(2, -1)
    images = model.decode(z, torch.tensor([0, 1]))
    assert not torch.allclose(images[0], images[1])


def test_conditional_model_requires_labels():
    model = build_model("cvae-conv", hidden_dims=(8, 16))
    with pytest.raises(ValueError, match="needs labels"):
        model.encode(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="unconditional"):
        build_model("mlp").encode(torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))


def test_decode_rejects_wrong_latent_shape_with_hint():
    model = build_model("mlp")
    with pytest.raises(ValueError, match=r"expected a latent of shape \(B, 20\).*mu, logvar"):
        model.decode(torch.randn(2, 40))


def test_encode_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 28, 28\)"):
        build_model("conv").encode(torch.rand(2, 3, 28, 28))


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'mlpp'.*valid models:.*mlp"):
        build_model("mlpp")
    with pytest.raises(ValueError, match="unknown preset 'conv-mnist' for model 'mlp'.*mlp-mnist"):
        build_model("mlp", preset="conv-mnist")
    with pytest.raises(ValueError, match="no field 'latent'"):
        make_config("mlp", latent=3)


@pytest.mark.parametrize("preset", [p for p in list_presets() if p != "chemeleon2"])
def test_every_preset_round_trips_through_its_config(preset):
    family = list_presets()[preset]
    model = build_model(family, preset=preset)
    data = config_to_dict(model.config)
    assert data["family"] == family
    assert config_from_dict(data) == model.config
    rebuilt = model_from_config(data)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def test_configs_are_frozen():
    config = make_config("conv")
    with pytest.raises(Exception, match="cannot assign"):
        config.latent_dim = 3


def test_default_mlp_is_the_classic_784_400_20():
    model = build_model("mlp")
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")]
    assert shapes[0] == (400, 784) and shapes[1] == (40, 400)  # 2 x 20 for (mu, logvar)


def test_conv_defaults_follow_the_issue():
    config = make_config("conv")
    assert config.hidden_dims == (32, 64, 128, 256)
    model = build_model("conv")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "ConvTranspose2d", "BatchNorm2d", "LeakyReLU"} <= kinds
