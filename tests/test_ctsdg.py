"""CTSDG (baselines.ctsdg): official sizes and key names, official checkpoint files, the official inference
path and its preprocessing quirk (ToPILImage's wrap of negative values), partial convolutions, the region
affinity attention, and the training step (official order, losses, the BN-freezing fine-tune stage)."""
import copy
import gc
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.color import rgb2gray
from skimage.feature import canny
from torchvision import transforms

from baselines.ctsdg import (CTSDG, PartialConv2d, ctsdg, ctsdg_tiny, region_affinity, structure_inputs,
                             to_signed, wrap_like_to_pil_image)
from bench.data.edges import gray_and_edges
from bench.errors import CheckpointError, UserError, WeightsUnavailable
from bench.metrics.pretrained_registry import resolve_weights

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SN = ("weight_orig", "weight_u", "weight_v")  # hook-based spectral norm, as in the released files


# ------------------------------------------------------------------ official key names (models/*)
def conv_keys(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in BN]


def official_generator_keys(levels: int = 7) -> list[str]:
    """generator.py: PConvBNActiv (bias-free ``conv``, ``bn`` except on the first encoder level) for
    ec_texture_1..7, dc_texture_7..1, ec_structure_1..7, dc_structure_7..1; then the projection heads,
    Bi-GFF (its own γ parameters first), fusion_layer1, CFA (only MSFA has weights), fusion_layer2, out_layer."""
    keys = []
    for branch in ("texture", "structure"):
        for level in range(1, levels + 1):
            keys += [f"ec_{branch}_{level}.conv.weight"] + (bn_keys(f"ec_{branch}_{level}.bn") if level > 1 else [])
        for level in range(levels, 0, -1):
            keys += [f"dc_{branch}_{level}.conv.weight"] + bn_keys(f"dc_{branch}_{level}.bn")
    for head, resolver in (("structure_feature_projection", "structure_resolver"),
                           ("texture_feature_projection", "texture_resolver")):
        keys += [f"{head}.{resolver}.conv1.weight", *bn_keys(f"{head}.{resolver}.bn1"),
                 f"{head}.{resolver}.conv2.weight", *bn_keys(f"{head}.{resolver}.bn2"), *conv_keys(f"{head}.out_layer.0")]
    keys += ["bigff.structure_gamma", "bigff.texture_gamma", *conv_keys("bigff.structure_gate.0"),
             *conv_keys("bigff.texture_gate.0"), *conv_keys("fusion_layer1.0")]
    for index in range(4):
        keys += conv_keys(f"cfa.msfa.dilated_conv_{index}.0")
    keys += conv_keys("cfa.msfa.weight_calc.0") + conv_keys("cfa.msfa.weight_calc.2")
    return keys + conv_keys("fusion_layer2.0") + conv_keys("out_layer.0")


def official_discriminator_keys() -> list[str]:
    """TextureBranch/StructureBranch bind conv1 also as ``features``, so both names are saved."""
    keys = [f"{branch}.{block}.0.{s}" for branch in ("texture_branch", "structure_branch")
            for block in ("conv1", "features", "conv2", "conv3", "conv4", "conv5") for s in SN]
    return keys + [*conv_keys("edge_detector.projection.0"), *bn_keys("edge_detector.projection.1"),
                   *conv_keys("edge_detector.res_layer.0"), *bn_keys("edge_detector.res_layer.1"),
                   *conv_keys("edge_detector.res_layer.3"), *bn_keys("edge_detector.res_layer.4"),
                   *conv_keys("edge_detector.out_layer.0")]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_size_parameter_counts_and_key_names():
    method = ctsdg()
    try:
        # counts obtained by instantiating the official classes (docs/official-sources.md)
        assert method.num_parameters() == {"generator": 52_147_789, "discriminator": 5_531_729}
        assert [count(getattr(method.discriminator, part)) for part in
                ("texture_branch", "structure_branch", "edge_detector")] == [2_763_776, 2_762_752, 5_201]
        assert list(method.generator.state_dict()) == official_generator_keys()
        assert list(method.discriminator.state_dict()) == official_discriminator_keys()
        assert method.paper_name == "CTSDG" and method.config.preprocessing == "official"
    finally:
        del method
        gc.collect()


# ------------------------------------------------------------------ helpers
def tiny(seed: int, **overrides) -> CTSDG:
    torch.manual_seed(seed)
    return ctsdg_tiny(**overrides)


def batch(size: int = 32, count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = 0.3 + 0.1 * torch.rand(count, 3, size, size, generator=generator)
    images[:, :, 4:20, 6:22] = 0.85  # a bright square: Canny finds edges
    images[1] = images[1].flip(-1)
    masks = torch.zeros(count, 1, size, size)
    masks[:, :, 12:26, 10:24] = 1
    return images, masks


def photo(size: int = 64) -> np.ndarray:
    """A real photograph (scikit-image's astronaut), uint8 H×W×3."""
    from skimage import data
    return np.array(Image.fromarray(data.astronaut()).resize((size, size), Image.BILINEAR))


def randomise_batch_norm_statistics(method: CTSDG, seed: int) -> None:
    """Running statistics away from their defaults, so a round trip that dropped buffers would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in method.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


# ------------------------------------------------------------------ the preprocessing quirk
def test_wrap_quirk_on_the_known_values():
    values = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert wrap_like_to_pil_image(values)[0, 0, 0].tolist() == [1, 129, 0, 127, 255]


def test_wrap_quirk_equals_torchvision_on_every_pixel_value():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    normalised = transforms.Normalize((0.5,) * 3, (0.5,) * 3)(transforms.ToTensor()(pixels))
    expected = torch.from_numpy(np.array(transforms.ToPILImage()(normalised))).permute(2, 0, 1)[None]
    images = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(wrap_like_to_pil_image(images), expected)


def official_image_to_edge(image: np.ndarray, sigma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """datasets/dataset.py + utils/canny.py, step by step: normalise, ToPILImage, rgb2gray, canny, ToTensor."""
    normalised = transforms.Normalize((0.5,) * 3, (0.5,) * 3)(transforms.ToTensor()(image))
    gray = rgb2gray(np.array(transforms.ToPILImage()(normalised)))
    edges = transforms.ToTensor()(Image.fromarray(canny(gray, sigma=sigma)))
    return transforms.ToTensor()(Image.fromarray(gray)), edges


def test_official_preprocessing_reproduces_the_official_dataset_bit_for_bit():
    image = photo()
    expected_gray, expected_edges = official_image_to_edge(image)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    gray, edges = structure_inputs(images, sigma=2.0, preprocessing="official")
    assert expected_edges.sum() > 0
    assert torch.equal(gray[0], expected_gray) and torch.equal(edges[0], expected_edges)
    # the quirk matters: the corrected input is a different picture
    corrected_gray, corrected_edges = structure_inputs(images, sigma=2.0, preprocessing="corrected")
    assert (corrected_gray - gray).abs().mean() > 0.1 and not torch.equal(corrected_edges, edges)


def test_corrected_preprocessing_is_the_switch_that_turns_the_quirk_off():
    images = torch.from_numpy(photo(32)).permute(2, 0, 1)[None].float() / 255
    official, corrected = tiny(0), tiny(0, preprocessing="corrected")
    wrapped_gray = official.structure_inputs(images)[0]
    true_gray, true_edges = corrected.structure_inputs(images)
    expected_gray, expected_edges = gray_and_edges(images, sigma=2.0)  # the image itself, whole-image Canny
    assert torch.equal(true_gray, expected_gray) and torch.equal(true_edges, expected_edges)
    assert not torch.allclose(wrapped_gray, true_gray)


# ------------------------------------------------------------------ official checkpoint files (trainer.py)
def write_official_checkpoint(source: CTSDG, path, prefix: str = "", discriminator: bool = True) -> None:
    def state(module):
        return {prefix + k: v for k, v in module.state_dict().items()}

    payload = {"n_iter": 1234, "generator": state(source.generator)}
    if discriminator:
        payload["discriminator"] = state(source.discriminator)
    torch.save(payload, path)


def test_official_checkpoint_loads_strictly_and_reproduces_the_saved_model(tmp_path):
    source, target = tiny(0), tiny(1)
    randomise_batch_norm_statistics(source, seed=7)
    images, masks = batch()
    assert not torch.allclose(source.inpaint(images, masks), target.inpaint(images, masks))
    write_official_checkpoint(source, tmp_path / "300000.pt")
    target.load(tmp_path / "300000.pt")
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    for name, network in source.networks().items():
        for key, value in network.state_dict().items():
            torch.testing.assert_close(target.networks()[name].state_dict()[key], value, rtol=0, atol=0)
    assert target.official_iteration == 1234


def test_official_checkpoint_variants_load(tmp_path):
    source = tiny(0)
    images, masks = batch()
    # generator only (enough to inpaint: absent or empty discriminator), and keys saved from a DataParallel wrapper
    write_official_checkpoint(source, tmp_path / "g.pt", discriminator=False)
    torch.save({"n_iter": 5, "generator": source.generator.state_dict(), "discriminator": {}}, tmp_path / "empty_d.pt")
    write_official_checkpoint(source, tmp_path / "ddp.pt", prefix="module.")
    for name in ("g.pt", "empty_d.pt", "ddp.pt"):
        target = tiny(1)
        discriminator_before = {k: v.clone() for k, v in target.discriminator.state_dict().items()}
        if name == "ddp.pt":
            target.load(tmp_path / name)
        else:
            with pytest.warns(UserWarning, match="a generator-only release"):
                target.load(tmp_path / name)
            assert all(torch.equal(v, discriminator_before[k]) for k, v in target.discriminator.state_dict().items())
            assert target.loaded_checkpoint.networks == ("generator",)
        torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)


def test_official_checkpoint_decides_levels_and_widths(tmp_path):
    source = tiny(0, encoder_channels=(8, 16, 32, 32), encoder_kernels=(7, 5, 3, 3), discriminator_channels=4,
                  edge_detector_channels=4)
    randomise_batch_norm_statistics(source, seed=9)
    write_official_checkpoint(source, tmp_path / "narrow.pt")
    info = CTSDG.inspect_official(tmp_path / "narrow.pt")
    assert info.config == {"encoder_channels": (8, 16, 32, 32), "encoder_kernels": (7, 5, 3, 3),
                           "preprocessing": "official", "discriminator_channels": 4, "edge_detector_channels": 4}
    assert info.variant == "ctsdg" and info.networks == ("generator", "discriminator")
    target = tiny(1, preprocessing="corrected").load(tmp_path / "narrow.pt")
    assert target.generator.levels == 4 and target.config.preprocessing == "official"
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    write_official_checkpoint(tiny(0), tmp_path / "tiny.pt")
    assert CTSDG.inspect_official(tmp_path / "tiny.pt").variant == "ctsdg_tiny"


def test_official_checkpoint_errors(tmp_path):
    source = tiny(0)
    broken = source.generator.state_dict()
    broken["dc_texture_2.conv.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save({"n_iter": 1, "generator": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*dc_texture_2\.conv\.weight"):
        tiny(1).load(tmp_path / "broken.pt")
    extra = {**source.generator.state_dict(), "ec_texture_9.conv.weight": torch.zeros(1)}
    torch.save({"n_iter": 1, "generator": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: ec_texture_9.conv.weight"):
        tiny(1).load(tmp_path / "extra.pt")
    torch.save({"n_iter": 1}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="empty.pt"):
        tiny(1).load(tmp_path / "empty.pt")
    with pytest.raises(UserError, match="not found"):
        tiny(1).load(tmp_path / "missing.pt")


def test_harness_checkpoint_round_trip(tmp_path):
    source, target = tiny(0), tiny(1)
    randomise_batch_norm_statistics(source, seed=8)
    source.save(tmp_path / "model.pt")
    target.load(tmp_path / "model.pt")
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)


# ------------------------------------------------------------------ official inference path (test.py)
def test_inference_inputs_and_output_are_the_official_ones():
    method = tiny(0)
    method.train()
    images, masks = batch()
    calls = []
    handle = method.generator.register_forward_hook(
        lambda module, args, output: calls.append((module.training, [a.clone() for a in args], output[0].clone())))
    prediction = method.inpaint(images, masks)
    handle.remove()
    (was_training, (image_input, structure_input, mask_input), output), = calls
    valid = 1 - masks
    gray, edges = structure_inputs(images, sigma=2.0, preprocessing="official")  # whole image, then masked
    assert not was_training and method.generator.training  # eval for inference, mode restored after
    torch.testing.assert_close(mask_input, valid, rtol=0, atol=0)
    torch.testing.assert_close(image_input, ((images - 0.5) / 0.5) * valid, rtol=0, atol=0)
    torch.testing.assert_close(structure_input, torch.cat((edges * valid, gray * valid), 1), rtol=0, atol=0)
    torch.testing.assert_close(prediction, ((output + 1) / 2).clamp(0, 1), rtol=0, atol=0)
    assert prediction.shape == images.shape


def test_generator_ignores_hole_pixels_of_its_inputs():
    method = tiny(0)
    method.eval()
    images, masks = batch()
    valid = 1 - masks
    image, structure = to_signed(images), torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * masks
    with torch.no_grad():
        first = method.generator(image, structure, valid)
        second = method.generator(image + noise[:, :3], structure + noise[:, 3:], valid)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("height, width", [(40, 72), (12, 20)])  # reflect-padded; replicate (pad > image)
def test_sizes_that_are_not_multiples_of_the_depth(height, width):
    method = tiny(0)
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(6))
    masks = torch.zeros(1, 1, height, width)
    masks[:, :, 3:9, 4:12] = 1
    output = method.inpaint(images, masks)
    assert output.shape == images.shape and torch.isfinite(output).all()


# ------------------------------------------------------------------ building blocks
def test_partial_convolution_equals_the_multi_channel_mask_formula():
    """Input given as two (features, one-channel mask) blocks vs the official form: one multi-channel mask,
    valid count = all-ones (out, in, k, k) convolution of it, output = conv(x·M)·(in·k²/count)·[count > 0]."""
    generator = torch.Generator().manual_seed(0)
    layer = PartialConv2d(5, 4, kernel_size=3, stride=2)
    x1, x2 = torch.randn(2, 3, 12, 12, generator=generator), torch.randn(2, 2, 12, 12, generator=generator)
    m1 = (torch.rand(2, 1, 12, 12, generator=generator) > 0.4).float()
    m1[:, :, :6], m1[:, :, 6:, 6:] = 1, 0  # all valid on top, a hole at the bottom right
    m2 = torch.zeros(2, 1, 12, 12)
    m2[:, :, :6] = 1
    output, updated = layer([(x1, m1), (x2, m2)])
    mask = torch.cat((m1.expand(-1, 3, -1, -1), m2.expand(-1, 2, -1, -1)), 1)
    counts = F.conv2d(mask, torch.ones(4, 5, 3, 3), stride=2, padding=1)
    expected = F.conv2d(torch.cat((x1, x2), 1) * mask, layer.weight, stride=2, padding=1) * 45 / counts.clamp(min=1)
    expected = expected * (counts > 0)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(updated.expand(-1, 4, -1, -1), (counts > 0).float(), rtol=0, atol=0)
    assert (counts == 0).any() and (counts == 45).any()  # the test covers empty and full windows


def test_region_affinity_equals_the_convolutional_form():
    """cfa.py's RAL: per sample, scores = conv2d(foreground, its normalised 3×3 patches), softmax ×10,
    output = conv_transpose2d(attention, the 4×4 background patches, stride 2, padding 1) / 4."""
    features = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(0))
    small = F.interpolate(features, scale_factor=0.5, mode="bilinear", align_corners=True)
    expected = []
    for foreground, background in zip(small, features):
        padded = F.pad(foreground, (1, 1, 1, 1))
        patches = padded.unfold(1, 3, 1).unfold(2, 3, 1).permute(1, 2, 0, 3, 4).reshape(-1, 6, 3, 3)
        norms = patches.pow(2).sum((1, 2, 3), keepdim=True).sqrt().clamp(min=1e-4)
        scores = F.conv2d(foreground[None], patches / norms, padding=1)
        attention = F.softmax(scores * 10, dim=1).clamp(min=1e-8)
        padded_background = F.pad(background, (1, 1, 1, 1))
        background_patches = padded_background.unfold(1, 4, 2).unfold(2, 4, 2).permute(1, 2, 0, 3, 4).reshape(-1, 6, 4, 4)
        expected.append(F.conv_transpose2d(attention, background_patches, stride=2, padding=1) / 4)
    torch.testing.assert_close(region_affinity(features), torch.cat(expected), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ training (trainer.py, criteria/loss.py)
def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed_parameters(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p, before[k]) for k, p in module.named_parameters())


def no_feature_losses(monkeypatch, method: CTSDG) -> None:
    """Skip the pretrained loss network where a test is about something else (fast, no weights needed)."""
    monkeypatch.setattr(method, "feature_losses", lambda *args: (torch.zeros(()), torch.zeros(())))


def vgg16_on_disk() -> bool:
    try:
        resolve_weights("vgg16", download=False)
    except WeightsUnavailable:
        return False
    return True


def test_train_step_trains_both_networks_with_the_official_losses():
    method = tiny(0)
    before = {name: snapshot(network) for name, network in method.networks().items()}
    images, masks = batch()
    losses = method.train_step({"image": images, "mask": masks})
    assert set(losses) == {"g_hole", "g_valid", "g_perceptual", "g_style", "g_adversarial", "g_intermediate",
                           "d_adversarial"}
    assert all(math.isfinite(v) for v in losses.values()) and losses["g_style"] > 0
    for name, network in method.networks().items():
        assert changed_parameters(network, before[name]), name
    if not vgg16_on_disk():  # offline: the labelled substitute, never a random VGG
        assert "EfficientNet-Lite0" in method.substitutions["perceptual"]
        assert "vgg16" in method.substitutions["perceptual"]
    # the loss network is never saved
    assert {key.split(".")[0] for key in method.state_dict()} == {"generator", "discriminator"}


def test_generator_loss_terms_follow_the_official_formulas(monkeypatch):
    method = tiny(0)
    no_feature_losses(monkeypatch, method)
    images, masks = batch()
    valid, truth = 1 - masks, to_signed(images)
    gray, edges = method.structure_inputs(images)
    generated = method.run_generator(truth, gray, edges, valid)
    losses = method.generator_losses(truth, valid, gray, edges, generated)
    output, projected_image, projected_edge = generated
    # l1((1-M)·out, (1-M)·gt) averages over every pixel and channel, holes or not
    torch.testing.assert_close(losses["g_hole"], 60 * ((output - truth).abs() * masks).mean())
    torch.testing.assert_close(losses["g_valid"], 10 * ((output - truth).abs() * valid).mean())
    bce = -(edges * projected_edge.log() + (1 - edges) * (1 - projected_edge).log()).mean()
    torch.testing.assert_close(losses["g_intermediate"], bce + (projected_image - truth).abs().mean())


def test_step_order_and_gradients_are_the_official_ones(monkeypatch):
    """G learns from its loss through the current D; D learns from its own loss on the detached output."""
    method = tiny(0)
    no_feature_losses(monkeypatch, method)
    reference = copy.deepcopy(method)
    no_feature_losses(monkeypatch, reference)
    images, masks = batch()
    valid, truth = 1 - masks, to_signed(images)
    reference.train()
    gray, edges = reference.structure_inputs(images)
    generated = reference.run_generator(truth, gray, edges, valid)
    losses = reference.generator_losses(truth, valid, gray, edges, generated)
    expected_g = torch.autograd.grad(sum(losses.values()), list(reference.generator.parameters()))
    expected_d = torch.autograd.grad(reference.discriminator_loss(truth, generated[0], gray, edges),
                                     list(reference.discriminator.parameters()))
    method.train_step({"image": images, "mask": masks})
    for parameter, expected in zip(method.generator.parameters(), expected_g):
        torch.testing.assert_close(parameter.grad, expected)
    for parameter, expected in zip(method.discriminator.parameters(), expected_d):
        torch.testing.assert_close(parameter.grad, expected)


def test_training_is_deterministic(monkeypatch):
    runs = []
    for _ in range(2):
        method = tiny(0)
        no_feature_losses(monkeypatch, method)
        runs.append([method.train_step(dict(zip(("image", "mask"), batch()))) for _ in range(2)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # the second step starts from updated weights


def generator_batch_norms(method: CTSDG) -> list[torch.nn.BatchNorm2d]:
    return [m for m in method.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("finetune", [False, True])
def test_finetune_stage_freezes_the_generator_batch_norm(monkeypatch, finetune):
    method = tiny(0, finetune=finetune)
    no_feature_losses(monkeypatch, method)
    lr = 5e-5 if finetune else 2e-4
    assert [group["lr"] for group in method.optimizers["generator"].param_groups] == [lr]
    assert [group["lr"] for group in method.optimizers["discriminator"].param_groups] == [pytest.approx(lr / 10)]
    statistics = [m.running_mean.clone() for m in generator_batch_norms(method)]
    affine = [m.weight.clone() for m in generator_batch_norms(method)]
    detector = method.discriminator.edge_detector.projection[1].running_mean.clone()
    method.train_step(dict(zip(("image", "mask"), batch())))
    assert method.generator.training
    assert all(m.training != finetune for m in generator_batch_norms(method))
    frozen = [torch.equal(m.running_mean, s) for m, s in zip(generator_batch_norms(method), statistics)]
    assert all(frozen) if finetune else not any(frozen)
    assert not any(torch.equal(m.weight, w) for m, w in zip(generator_batch_norms(method), affine))  # still trained
    assert not torch.equal(method.discriminator.edge_detector.projection[1].running_mean, detector)  # D not frozen


def test_bad_options_raise_user_errors():
    with pytest.raises(UserError, match="preprocessing"):
        ctsdg_tiny(preprocessing="fixed")
    with pytest.raises(UserError, match="feature_network"):
        ctsdg_tiny(feature_network="vgg19")
    with pytest.raises(UserError, match="encoder_kernels"):
        ctsdg_tiny(encoder_kernels=(7, 5))
    with pytest.raises(UserError):
        ctsdg_tiny(no_such_option=1)


def test_host_made_structure_inputs_give_the_same_training_step_and_inference(monkeypatch):
    """The training loop's data path (and evaluation's) computes gray + Canny with ``host_preprocessing`` on the
    CPU batch; the step and the prediction are the same as when the method computes them itself."""
    images, masks = batch()
    method = tiny(0)
    no_feature_losses(monkeypatch, method)
    reference = copy.deepcopy(method)
    no_feature_losses(monkeypatch, reference)
    for purpose in ("train", "inpaint"):  # CTSDG's inputs come from the whole image either way
        inputs = method.host_preprocessing(purpose)(images, masks)
        expected_gray, expected_edges = method.structure_inputs(images)
        assert torch.equal(inputs["gray"], expected_gray) and torch.equal(inputs["edges"], expected_edges)
    inputs = method.host_preprocessing("train")(images, masks)
    assert method.train_step({"image": images, "mask": masks, **inputs}) == reference.train_step(
        {"image": images, "mask": masks})
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), reference.state_dict().values()))
    inputs = method.host_preprocessing("inpaint")(images, masks)
    assert torch.equal(method.inpaint(images, masks, **inputs), method.inpaint(images, masks))
