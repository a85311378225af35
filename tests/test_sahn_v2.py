"""SAHN v2 (issue 20): mask-guided discriminator targets, SPL/SPN's initialisation, the inference kernel of
the deformable convolution."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import DeformConv2d, deform_conv2d

import bench
from bench.errors import UserError
from bench.nn.layers import DeformableConv2d, gather_deform_conv2d
from bench.nn.losses import discriminator_adversarial_loss, generator_adversarial_loss
from sahn.deformable import SAHNDeformableConv2d, bag_deform_conv2d
from sahn.discriminator import MaskGuidedDiscriminator, discriminator_loss, generator_loss
from sahn.model import SAHNConfig, broken_image, sahn_paper, sahn_tiny


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors gain nothing from a second thread on the shared 2-core machine (see test_sahn.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hole_square(size: int, top: int, left: int, side: int, count: int = 1) -> torch.Tensor:
    masks = torch.zeros(count, 1, size, size)
    masks[..., top:top + side, left:left + side] = 1
    return masks


# --------------------------------------------------------------------- mask-guided D targets
def test_a_known_mask_gives_the_expected_patch_labels():
    discriminator = MaskGuidedDiscriminator((8, 8, 8))
    # 64² → 4×4 logits; logit row i reads pixel rows 16i − 15 … 16i + 30, so an 8×8 hole in the top-left
    # corner is seen by rows and columns 0 and 1 only
    labels = discriminator.fake_patches(hole_square(64, 0, 0, 8))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(labels[0, 0], expected)
    assert not discriminator.fake_patches(torch.zeros(1, 1, 64, 64)).any()  # no hole: every patch is real


def test_patch_labels_are_the_receptive_fields_that_touch_a_hole():
    """Each logit's receptive field measured by autograd (pixels with a non-zero gradient), not by the rule."""
    torch.manual_seed(0)
    discriminator = MaskGuidedDiscriminator((4, 4, 4), use_spectral_norm=False)
    images = torch.rand(1, 3, 48, 80, requires_grad=True)
    logits = discriminator(images)
    masks = torch.zeros(1, 1, 48, 80)
    masks[..., 30:33, 51:53] = 1
    masks[..., 2, 5] = 1
    labels = discriminator.fake_patches(masks)
    assert labels.shape == logits.shape
    for row in range(logits.shape[-2]):
        for col in range(logits.shape[-1]):
            (gradient,) = torch.autograd.grad(logits[0, 0, row, col], images, retain_graph=True)
            field = gradient.abs().sum(1, keepdim=True) > 0
            assert labels[0, 0, row, col].item() == float((field & (masks > 0)).any())
    assert 0 < labels.sum() < labels.numel()


def test_patches_without_hole_pixels_look_the_same_to_d_in_the_real_and_the_restored_image():
    torch.manual_seed(0)
    discriminator = MaskGuidedDiscriminator((8, 16, 16)).eval()  # eval: no power iteration between the calls
    images, masks = torch.rand(2, 3, 96, 96), hole_square(96, 60, 10, 12, count=2)
    restored = images * (1 - masks) + torch.rand_like(images) * masks
    with torch.no_grad():
        real, fake = discriminator(images), discriminator(restored)
    labels = discriminator.fake_patches(masks).bool()
    assert torch.allclose(real[~labels], fake[~labels], atol=1e-6)  # real targets there are consistent
    assert (real[labels] - fake[labels]).abs().min() > 0


def test_mask_reading_targets_real_outside_the_fake_patches_and_image_reading_is_unchanged():
    torch.manual_seed(0)
    real, fake = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    labels = torch.zeros(2, 1, 3, 3)
    labels[0, 0, 1, 1] = labels[1, 0, 2, 0] = 1
    softplus = nn.functional.softplus
    expected_d = softplus(-real).mean() + torch.where(labels > 0, softplus(fake), softplus(-fake)).mean()
    assert torch.allclose(discriminator_loss(real, fake, labels), expected_d)
    expected_g = (softplus(-fake[0, 0, 1, 1]) + softplus(-fake[1, 0, 2, 0])) / 2
    assert torch.allclose(generator_loss(fake, labels), expected_g)
    # every patch fake: the mask reading is the image reading, which is the shared non-saturating loss
    all_fake = torch.ones_like(labels)
    assert torch.allclose(discriminator_loss(real, fake, all_fake), discriminator_loss(real, fake, None))
    assert torch.allclose(discriminator_loss(real, fake, None), discriminator_adversarial_loss(real, fake))
    assert torch.allclose(generator_loss(fake, None), generator_adversarial_loss(fake))


def test_d_target_defaults_to_the_mask_and_the_image_reading_is_a_registered_variant():
    assert SAHNConfig().d_target == "mask"
    torch.manual_seed(0)
    tiny = sahn_tiny()
    assert tiny.config.d_target == "mask"
    masks = hole_square(64, 0, 0, 8)
    assert torch.equal(tiny.fake_patches(masks), tiny.discriminator.fake_patches(masks))
    image_reading = bench.create_method("sahn_tiny_d_image", lr=1e-3)
    assert image_reading.config.d_target == "image" and image_reading.config.lr == 1e-3
    assert image_reading.paper_name == "SAHN" and image_reading.fake_patches(masks) is None
    assert "sahn_tiny_d_image" not in bench.available_methods("tiny")  # only when asked for by name
    with pytest.raises(UserError, match="d_target"):
        sahn_tiny(d_target="patch")


@pytest.mark.parametrize("d_target", ["mask", "image"])
def test_train_step_uses_the_chosen_reading(d_target):
    """The D loss a step reports is the chosen reading's loss on D's logits before the step."""
    torch.manual_seed(0)
    method = sahn_tiny(d_target=d_target)
    images, masks = torch.rand(2, 3, 64, 64), hole_square(64, 40, 40, 8, count=2)
    discriminator = copy.deepcopy(method.discriminator)  # one forward, as the step's (spectral norm iterates)
    with torch.no_grad():
        restored = method.restored_image(images, masks, method.generator(broken_image(images, masks), masks).image)
        real, fake = discriminator(torch.cat([images, restored])).chunk(2)
    labels = method.discriminator.fake_patches(masks) if d_target == "mask" else None
    expected = discriminator_loss(real, fake, labels).item()
    assert float(method.train_step({"image": images, "mask": masks})["d"]) == pytest.approx(expected, rel=1e-5)
    other = discriminator_loss(real, fake, None if d_target == "mask" else method.discriminator.fake_patches(masks))
    assert other.item() != pytest.approx(expected, rel=1e-3)  # the two readings differ on this mask


# --------------------------------------------------------------------- initialisation
@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return sahn_paper()


def test_fresh_sahn_paper_convolutions_are_initialised_as_spl_and_spn(paper_model):
    offsets = {id(m.offset) for m in paper_model.modules() if isinstance(m, DeformableConv2d)}
    moments = torch.zeros(5, dtype=torch.float64)  # count, Σw, Σw², Σw³, Σw⁴ over every initialised weight
    checked = 0
    for module in paper_model.modules():
        if not isinstance(module, (nn.Conv2d, DeformConv2d)):
            continue
        weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        if id(module) in offsets:
            assert not weight.any() and not module.bias.any()  # offsets start at zero (a regular conv)
            continue
        checked += 1
        assert module.bias is None or not module.bias.any()
        values = weight.detach().double().flatten()
        moments += torch.stack([torch.tensor(values.numel(), dtype=torch.float64)] + [values.pow(k).sum() for k in (1, 2, 3, 4)])
        if values.numel() >= 1000:  # per layer, within five standard errors of N(0, 0.02)'s mean and std
            assert abs(values.mean().item()) < 5 * 0.02 / values.numel() ** 0.5
            assert values.std().item() == pytest.approx(0.02, rel=5 / (2 * values.numel()) ** 0.5)
    count, first, second, _, fourth = moments.tolist()
    assert checked > 100 and abs(first / count) < 5 * 0.02 / count ** 0.5
    assert (second / count) ** 0.5 == pytest.approx(0.02, rel=1e-3)
    excess_kurtosis = fourth / count / (second / count) ** 2 - 3  # 0 for a normal law, −1.2 for PyTorch's uniform
    assert abs(excess_kurtosis) < 0.01


# --------------------------------------------------------------------- deformable convolution kernels
@pytest.mark.parametrize("channels,out_channels,size,dilation,offset_scale", [
    (256, 256, 16, 1, 3.0),  # the paper's coarsest MSF width
    (64, 64, 40, 1, 1.5),
    (5, 7, 11, 2, 2.5),  # odd sizes, dilation
    (3, 4, 9, 1, 12.0),  # samples far outside the image
])
def test_bag_kernel_equals_torchvision(channels, out_channels, size, dilation, offset_scale):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size + 3, generator=generator)
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) * 0.05
    bias = torch.randn(out_channels, generator=generator)
    offset = torch.randn(2, 18, size, size + 3, generator=generator) * offset_scale
    reference = deform_conv2d(x, offset, weight, bias, padding=dilation, dilation=dilation)
    for block_bytes in (4 << 20, 2 * 9 * (size + 3) * channels * 4, 1):  # whole images; 2 rows; 1 row per block
        ours = bag_deform_conv2d(x, offset, weight, bias, padding=dilation, dilation=dilation, block_bytes=block_bytes)
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    no_bias = bag_deform_conv2d(x, offset, weight, None, padding=dilation, dilation=dilation)
    assert torch.allclose(no_bias, reference - bias.view(1, -1, 1, 1), atol=1e-5, rtol=1e-5)


def randomise_offsets_(module: nn.Module, seed: int = 0) -> None:
    """Offsets of a few pixels, fractional: a fresh model's zero offsets would test only integer taps.

    The weights scale with 1/√fan-in so that offsets stay at a pixel or two at any width: offsets of tens of
    pixels make a random network chaotic (each layer multiplies a perturbation, float rounding included)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, DeformableConv2d):
            weight = layer.offset.weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05 / weight[0].numel() ** 0.5)
                layer.offset.bias.copy_(torch.rand(layer.offset.bias.shape, generator=generator) * 4 - 2)


def test_the_layer_trains_with_the_gather_kernel_and_infers_with_the_chosen_one():
    torch.manual_seed(0)
    layer = SAHNDeformableConv2d(6, 5)
    randomise_offsets_(layer)
    x = torch.randn(2, 6, 12, 10)
    offset = layer.offset(x)
    weight, bias = layer.conv.weight, layer.conv.bias
    training = layer(x)
    assert training.grad_fn is not None
    assert torch.equal(training, gather_deform_conv2d(x, offset, weight, bias, padding=1))
    with torch.no_grad():
        assert torch.equal(layer(x), bag_deform_conv2d(x, offset, weight, bias, padding=1))  # auto on CPU
        layer.inference_kernel = "torchvision"
        assert torch.equal(layer(x), deform_conv2d(x, offset, weight, bias, padding=1))
        layer.inference_kernel = "gather"
        assert torch.equal(layer(x), gather_deform_conv2d(x, offset, weight, bias, padding=1))
    with pytest.raises(ValueError, match="inference_kernel"):
        SAHNDeformableConv2d(2, 2, inference_kernel="fast")
    with pytest.raises(UserError, match="deform_inference"):
        sahn_tiny(deform_inference="fast")


def test_inference_output_equals_the_training_path_at_256():
    torch.manual_seed(0)
    method = sahn_tiny(deformable_scales=(1, 2, 3))  # deformable convs at 64², 128² and 256²
    randomise_offsets_(method.generator)
    images, masks = torch.rand(1, 3, 256, 256), hole_square(256, 64, 96, 100)
    inferred = method.inpaint(images, masks)
    method.eval()
    with torch.enable_grad():
        trained = method.generator(broken_image(images, masks), masks).image.clamp(0, 1)
    assert trained.grad_fn is not None  # the training kernel ran
    assert (inferred - trained.detach()).abs().max().item() <= 1e-5
    assert (inferred - images).abs().max() > 0.1  # not a trivial output


def test_every_inference_kernel_counts_the_same_flops():
    torch.manual_seed(0)
    method = sahn_tiny()
    randomise_offsets_(method.generator)
    images, masks = torch.rand(1, 3, 64, 64), hole_square(64, 16, 16, 24)
    counts = set()
    for kernel in ("bag", "torchvision", "gather"):
        for layer in method.generator.modules():
            if isinstance(layer, SAHNDeformableConv2d):
                layer.inference_kernel = kernel
        counter = FlopCounterMode(display=False)
        with counter:
            method.inpaint(images, masks)
        counts.add(counter.get_total_flops())
    assert len(counts) == 1 and counts.pop() > 0


# --------------------------------------------------------------------- the ablation pipeline
def test_the_ablation_pipeline_runs_both_d_readings_side_by_side(monkeypatch):
    import pipelines.full_benchmark
    from pipelines import ablation

    runs = []
    monkeypatch.setattr(pipelines.full_benchmark, "run_benchmark", lambda config: runs.append(config))
    ablation.main(["--config", "d_target"])
    (config,) = runs
    assert config.methods == ["sahn_tiny", "sahn_tiny_d_image"] and config.scale == "tiny"
    assert len(config.masks.bins) == 6  # small holes are where the readings differ
    ablation.main(["--methods", "sahn_paper", "sahn_paper_d_image"])  # any run may name them
    assert runs[-1].methods == ["sahn_paper", "sahn_paper_d_image"]
    with pytest.raises(UserError, match="sahn_tiny_d_image"):
        ablation.main(["--methods", "sahn_tiny"])
