"""bench.nn.losses: adversarial, hole-weighted L1, semantic prior and perceptual losses."""
import math

import pytest
import torch

from bench.errors import UserError
from bench.nn.losses import (PerceptualLoss, create_perceptual_loss, discriminator_adversarial_loss,
                          generator_adversarial_loss, hole_weighted_l1, resize_mask, semantic_prior_loss)


# --------------------------------------------------------------------- adversarial
def test_gan_losses_match_the_log_likelihood_form():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sigmoid = torch.sigmoid
    expected_d = -torch.log(sigmoid(real)).mean() - torch.log(1 - sigmoid(fake)).mean()
    expected_g = -torch.log(sigmoid(fake)).mean()
    assert torch.allclose(discriminator_adversarial_loss(real, fake), expected_d, atol=1e-6)
    assert torch.allclose(generator_adversarial_loss(fake), expected_g, atol=1e-6)
    # undecided discriminator: log 2 per term
    zeros = torch.zeros(4)
    assert discriminator_adversarial_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2), abs=1e-6)


def test_generator_loss_does_not_saturate_when_the_discriminator_wins():
    """A confidently rejected fake (logit −20) still gets a full-size gradient: that is the point of
    −log D(G) over log(1 − D(G)), whose gradient vanishes there."""
    fake = torch.tensor([-20.0], requires_grad=True)
    generator_adversarial_loss(fake).backward()
    assert fake.grad.item() == pytest.approx(-1.0, abs=1e-6)
    saturating = torch.tensor([-20.0], requires_grad=True)
    torch.log(1 - torch.sigmoid(saturating)).sum().backward()
    assert abs(saturating.grad.item()) < 1e-6


# --------------------------------------------------------------------- hole-weighted L1
def test_hole_weighted_l1_weighs_the_hole_by_one_plus_w():
    target = torch.zeros(2, 3, 8, 8)
    prediction = target + 0.5
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :2, :] = 1  # a quarter of the pixels are holes
    assert hole_weighted_l1(prediction, target, mask, 2.0).item() == pytest.approx(0.5 * (1 + 2.0 * 0.25))
    # an error only inside the hole counts (1 + w) times
    inside = target + 0.5 * mask
    assert hole_weighted_l1(inside, target, mask, 3.0).item() == pytest.approx(0.5 * 0.25 * (1 + 3.0))
    assert hole_weighted_l1(inside, target, mask, 0.0).item() == pytest.approx(0.5 * 0.25)


def test_resize_mask_keeps_the_hole_fraction():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 0, 0] = 1
    small = resize_mask(mask, (4, 4))
    assert small[0, 0, 0, 0].item() == pytest.approx(0.25)
    assert small.sum().item() == pytest.approx(0.25)
    assert resize_mask(mask, (8, 8)) is mask
    assert resize_mask(mask, (16, 16)).sum().item() == pytest.approx(4.0)  # nearest upsampling


# --------------------------------------------------------------------- semantic prior
def _three_scales(channels=(5, 6, 7), size=16, batch=2):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, size // 2 ** i, size // 2 ** i, generator=generator) for i, c in enumerate(channels)]


@pytest.mark.parametrize("alpha", [0.2, 0.4, 0.6, 0.8])
def test_prior_loss_weights_hole_errors_by_one_plus_alpha(alpha):
    targets = _three_scales()
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :, :8] = 1  # left half: block-aligned at every scale
    error = 0.3
    # an error of 0.3 inside the hole only: each scale contributes 0.3 · ½ · (1 + α)
    predictions = [t + error * resize_mask(mask, t.shape[-2:]) for t in targets]
    assert semantic_prior_loss(predictions, targets, mask, alpha).item() == pytest.approx(3 * error * 0.5 * (1 + alpha))
    # the same error outside the hole counts once
    outside = [t + error * (1 - resize_mask(mask, t.shape[-2:])) for t in targets]
    assert semantic_prior_loss(outside, targets, mask, alpha).item() == pytest.approx(3 * error * 0.5)


def test_prior_loss_is_zero_for_perfect_predictions_and_checks_shapes():
    targets = _three_scales()
    mask = torch.ones(2, 1, 16, 16)
    assert semantic_prior_loss(targets, targets, mask, 0.8).item() == 0.0
    with pytest.raises(ValueError):
        semantic_prior_loss(targets[:2], targets, mask, 0.8)
    with pytest.raises(ValueError):
        semantic_prior_loss([targets[1], targets[0], targets[2]], targets, mask, 0.8)


# --------------------------------------------------------------------- perceptual
@pytest.fixture(scope="module")
def lite0_perceptual():
    return create_perceptual_loss("efficientnet_lite0", (), substitute_stages=(0, 1, 2))


def test_perceptual_loss_compares_features_and_trains_only_the_input(lite0_perceptual):
    loss, substitution = lite0_perceptual
    assert isinstance(loss, PerceptualLoss)
    assert "EfficientNet-Lite0" in substitution and "VGG16" in substitution
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=generator)
    assert loss(target, target).item() == 0.0
    output = torch.rand(2, 3, 32, 32, generator=generator, requires_grad=True)
    value = loss(output, target)
    assert value.item() > 0
    value.backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())


def test_perceptual_loss_layer_weights_scale_each_layer(lite0_perceptual):
    loss, _ = lite0_perceptual
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 3, 32, 32, generator=generator), torch.rand(1, 3, 32, 32, generator=generator)
    per_layer = [PerceptualLoss(loss.network, w)(a, b).item() for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    weighted = PerceptualLoss(loss.network, (2.0, 0.5, 3.0))(a, b).item()
    assert weighted == pytest.approx(2.0 * per_layer[0] + 0.5 * per_layer[1] + 3.0 * per_layer[2], rel=1e-5)
    with pytest.raises(ValueError):
        PerceptualLoss(loss.network, (1.0, 1.0))(a, b)


def test_vgg16_without_weights_is_substituted_and_recorded():
    loss, substitution = create_perceptual_loss("vgg16", ("relu1_2", "relu2_2"), substitute_stages=(0, 1))
    assert loss.name.startswith("efficientnet_lite0")
    assert "vgg16" in substitution and "instead of" in substitution


def test_unknown_perceptual_network_is_a_user_error():
    with pytest.raises(UserError, match="resnet"):
        create_perceptual_loss("resnet", ())
