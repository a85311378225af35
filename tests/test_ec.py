"""EdgeConnect (baselines.ec): official sizes and key names, official checkpoint folders, the official
inference path (known-pixel Canny, G1/G2 inputs), and training stages."""
import copy
import gc
import math

import pytest
import torch

from baselines.ec import EdgeConnect, ec, ec_tiny
from bench.nn.discriminators import PatchDiscriminator
from bench.data.edges import gray_and_edges
from bench.errors import CheckpointError, UserError, WeightsUnavailable
from bench.metrics.pretrained_registry import resolve_weights

SN = ("weight_orig", "weight_u", "weight_v")  # hook-based spectral norm, as in the released files


# ------------------------------------------------------------------ official key names (src/networks.py)
def official_generator_keys(spectral_norm: bool, blocks: int = 8) -> list[str]:
    """Key names of the official EdgeGenerator (spectral_norm=True) / InpaintGenerator, in state_dict order.

    Encoder convs at Sequential indices 1, 4, 7; ResnetBlock convs at conv_block.1 and .5 (bias only
    without spectral norm); decoder transposed convs at 0 and 3, final conv (never normalised) at 7."""
    def conv(prefix: str, bias: bool, normed: bool) -> list[str]:
        bias_key = [f"{prefix}.bias"] if bias else []
        # spectral norm re-registers the weight (as weight_orig) after the bias; a plain conv lists weight first
        return bias_key + [f"{prefix}.{s}" for s in SN] if normed else [f"{prefix}.weight"] + bias_key

    keys = []
    for index in (1, 4, 7):
        keys += conv(f"encoder.{index}", True, spectral_norm)
    for block in range(blocks):
        for index in (1, 5):
            keys += conv(f"middle.{block}.conv_block.{index}", not spectral_norm, spectral_norm)
    for index in (0, 3):
        keys += conv(f"decoder.{index}", True, spectral_norm)
    return keys + conv("decoder.7", True, False)


def official_discriminator_keys() -> list[str]:
    """conv1 is also bound as ``features`` in the official class, so both names are saved."""
    return [f"{block}.0.{s}" for block in ("conv1", "features", "conv2", "conv3", "conv4", "conv5") for s in SN]


def test_paper_sizes_parameter_counts_and_key_names():
    method = ec()
    try:
        # counts obtained by instantiating the official classes (docs/official-sources.md)
        assert method.num_parameters() == {"edge_generator": 10_761_089, "inpaint_generator": 10_774_595,
                                           "edge_discriminator": 2_762_752, "inpaint_discriminator": 2_763_776}
        assert list(method.edge_generator.state_dict()) == official_generator_keys(spectral_norm=True)
        assert list(method.inpaint_generator.state_dict()) == official_generator_keys(spectral_norm=False)
        assert list(method.edge_discriminator.state_dict()) == official_discriminator_keys()
        assert list(method.inpaint_discriminator.state_dict()) == official_discriminator_keys()
        assert method.paper_name == "EC"
    finally:
        del method
        gc.collect()


def test_patch_discriminator_options():
    plain = PatchDiscriminator(3, use_sigmoid=True, use_spectral_norm=False, base_channels=8)
    assert "conv1.0.bias" in plain.state_dict() and "conv1.0.weight" in plain.state_dict()
    scores, activations = plain(torch.rand(2, 3, 32, 32))
    assert len(activations) == 5 and scores.min() >= 0 and scores.max() <= 1
    torch.testing.assert_close(scores, torch.sigmoid(activations[-1]))
    assert plain.features is plain.conv1


# ------------------------------------------------------------------ helpers
def tiny(seed: int, **overrides) -> EdgeConnect:
    torch.manual_seed(seed)
    return ec_tiny(**overrides)


def batch(size: int = 32, count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = 0.3 + 0.1 * torch.rand(count, 3, size, size, generator=generator)
    images[:, :, 4:20, 6:22] = 0.85  # a bright square: Canny finds edges
    masks = torch.zeros(count, 1, size, size)
    masks[:, :, 12:26, 10:24] = 1
    return images, masks


def capture_inputs(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _module, args, output: store.append((args[0].clone(), output.clone())))


# ------------------------------------------------------------------ official checkpoint folder
def write_official_folder(source: EdgeConnect, folder, prefix: str = "") -> None:
    """The layout of the released checkpoints (src/models.py BaseModel.save)."""
    def state(module):
        return {prefix + k: v for k, v in module.state_dict().items()}

    torch.save({"iteration": 11, "generator": state(source.edge_generator)}, folder / "EdgeModel_gen.pth")
    torch.save({"discriminator": state(source.edge_discriminator)}, folder / "EdgeModel_dis.pth")
    torch.save({"iteration": 22, "generator": state(source.inpaint_generator)}, folder / "InpaintingModel_gen.pth")
    torch.save({"discriminator": state(source.inpaint_discriminator)}, folder / "InpaintingModel_dis.pth")


def test_official_folder_loads_strictly_and_reproduces_the_saved_model(tmp_path):
    source, target = tiny(0), tiny(1)
    images, masks = batch()
    assert not torch.allclose(source.inpaint(images, masks), target.inpaint(images, masks))
    write_official_folder(source, tmp_path)
    target.load(tmp_path)
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    for name, network in source.networks().items():
        for key, value in network.state_dict().items():
            torch.testing.assert_close(target.networks()[name].state_dict()[key], value, rtol=0, atol=0)
    assert target.official_iterations == {"edge": 11, "inpaint": 22}


def test_official_folder_saved_by_data_parallel_loads(tmp_path):
    source, target = tiny(0), tiny(1)
    write_official_folder(source, tmp_path, prefix="module.")
    target.load(tmp_path)
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)


def test_official_folder_errors(tmp_path):
    source = tiny(0)
    write_official_folder(source, tmp_path)
    (tmp_path / "InpaintingModel_gen.pth").unlink()
    with pytest.raises(CheckpointError, match="an EdgeConnect release folder without InpaintingModel_gen.pth"):
        tiny(1).load(tmp_path)
    with pytest.raises(CheckpointError, match="one file of an EdgeConnect release; load the folder"):
        tiny(1).load(tmp_path / "EdgeModel_gen.pth")
    # a tensor whose shape contradicts the rest of the file fails strictly, naming the offending key
    broken = source.edge_generator.state_dict()
    broken["middle.1.conv_block.1.weight_orig"] = torch.zeros(3, 3, 3, 3)
    write_official_folder(source, tmp_path)
    torch.save({"iteration": 1, "generator": broken}, tmp_path / "EdgeModel_gen.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*middle\.1\.conv_block\.1\.weight_orig"):
        tiny(1).load(tmp_path)
    extra = {**source.edge_generator.state_dict(), "encoder.99.weight": torch.zeros(1)}
    torch.save({"iteration": 1, "generator": extra}, tmp_path / "EdgeModel_gen.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.99.weight"):
        tiny(1).load(tmp_path)


def test_official_folder_decides_the_network_sizes(tmp_path):
    """Widths and block counts come from the files, whatever the variant was created with."""
    source = tiny(0, base_channels=8, residual_blocks=3, discriminator_channels=4)
    write_official_folder(source, tmp_path)
    info = EdgeConnect.inspect_official(tmp_path)
    assert info.config == {"base_channels": 8, "residual_blocks": 3, "discriminator_channels": 4}
    assert info.variant == "ec" and info.format == "official"
    assert set(info.files) == {"EdgeModel_gen.pth", "EdgeModel_dis.pth", "InpaintingModel_gen.pth",
                               "InpaintingModel_dis.pth"}
    target = tiny(1).load(tmp_path)
    config = target.config
    assert (config.base_channels, config.residual_blocks, config.discriminator_channels) == (8, 3, 4)
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    assert target.loaded_checkpoint == info
    # the CPU-sized preset's shapes name the tiny variant
    write_official_folder(tiny(0), tmp_path)
    assert EdgeConnect.inspect_official(tmp_path).variant == "ec_tiny"


def test_generator_only_folder_loads_with_a_warning(tmp_path):
    source = tiny(0)
    write_official_folder(source, tmp_path)
    for name in ("EdgeModel_dis.pth", "InpaintingModel_dis.pth"):
        (tmp_path / name).unlink()
    target = tiny(1)
    discriminator_before = {k: v.clone() for k, v in target.inpaint_discriminator.state_dict().items()}
    with pytest.warns(UserWarning, match="a generator-only release"):
        target.load(tmp_path)
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    assert all(torch.equal(v, discriminator_before[k]) for k, v in target.inpaint_discriminator.state_dict().items())
    assert target.loaded_checkpoint.networks == ("edge_generator", "inpaint_generator")


def test_harness_checkpoint_round_trip(tmp_path):
    source, target = tiny(0), tiny(1)
    source.save(tmp_path / "model.pt")
    target.load(tmp_path / "model.pt")
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)


# ------------------------------------------------------------------ official inference path
def test_inference_inputs_are_the_official_ones():
    method = tiny(0)
    images, masks = batch()
    g1_calls, g2_calls = [], []
    handles = [capture_inputs(method.edge_generator, g1_calls), capture_inputs(method.inpaint_generator, g2_calls)]
    output = method.inpaint(images, masks)
    for handle in handles:
        handle.remove()
    gray, edges = gray_and_edges(images, sigma=2.0, masks=masks)  # rgb2gray, Canny σ 2 on known pixels
    (g1_input, g1_output), = g1_calls
    (g2_input, g2_output), = g2_calls
    torch.testing.assert_close(g1_input, torch.cat((gray * (1 - masks) + masks, edges * (1 - masks), masks), 1))
    # G2 gets the white-holed image and G1's *whole* edge map (no merge with the known edges)
    torch.testing.assert_close(g2_input, torch.cat((images * (1 - masks) + masks, g1_output), 1), rtol=0, atol=0)
    torch.testing.assert_close(output, g2_output, rtol=0, atol=0)
    assert output.shape == images.shape and output.min() >= 0 and output.max() <= 1


def test_hole_pixels_do_not_reach_the_edges_fed_to_g1():
    method = tiny(0)
    images, masks = batch()
    altered = torch.where(masks > 0, torch.rand(images.shape, generator=torch.Generator().manual_seed(5)), images)
    assert not torch.equal(altered, images)
    calls = []
    handle = capture_inputs(method.edge_generator, calls)
    first, second = method.inpaint(images, masks), method.inpaint(altered, masks)
    handle.remove()
    assert calls[0][0][:, 1].sum() > 0  # G1 does receive known edges
    torch.testing.assert_close(calls[1][0], calls[0][0], rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_sizes_that_are_not_multiples_of_four():
    method = tiny(0)
    images = torch.rand(1, 3, 30, 34, generator=torch.Generator().manual_seed(6))
    masks = torch.zeros(1, 1, 30, 34)
    masks[:, :, 8:20, 10:22] = 1
    output = method.inpaint(images, masks)
    assert output.shape == images.shape and torch.isfinite(output).all()


def test_inpaint_leaves_training_mode_alone():
    method = tiny(0)
    method.train()
    method.inpaint(*batch())
    assert method.edge_generator.training and method.inpaint_generator.training


# ------------------------------------------------------------------ training
def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p, before[k]) for k, p in module.named_parameters())


def vgg19_on_disk() -> bool:
    try:
        resolve_weights("vgg19", download=False)
    except WeightsUnavailable:
        return False
    return True


@pytest.mark.parametrize("stage, trained", [("edge", {"edge"}), ("inpaint", {"inpaint"}),
                                            ("edge_inpaint", {"inpaint"}), ("joint", {"edge", "inpaint"})])
def test_each_stage_trains_exactly_its_networks(stage, trained):
    method = tiny(0, stage=stage)
    before = {name: snapshot(network) for name, network in method.networks().items()}
    losses = method.train_step(dict(zip(("image", "mask"), batch())))
    assert all(math.isfinite(v) for v in losses.values())
    expected = {"edge": {"edge_d", "edge_g_adv", "edge_g_fm"},
                "inpaint": {"inpaint_d", "inpaint_g_adv", "inpaint_g_l1", "inpaint_g_perceptual", "inpaint_g_style"}}
    assert set(losses) == set().union(*(expected[m] for m in trained))
    for name, network in method.networks().items():
        assert changed(network, before[name]) == (name.split("_")[0] in trained), name
    # perceptual/style network: VGG19 when its weights are on disk, else the labelled substitute
    if "inpaint" in trained and not vgg19_on_disk():
        assert "EfficientNet-Lite0" in method.substitutions["perceptual"]
    else:
        assert "perceptual" not in method.substitutions
    # the loss network is never saved: the state_dict holds the four networks only
    assert {key.split(".")[0] for key in method.state_dict()} == set(method.networks())


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        method = tiny(0, stage="edge")  # the stage without the pretrained loss network: fast
        runs.append([method.train_step(dict(zip(("image", "mask"), batch()))) for _ in range(2)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # the second step starts from updated weights


def test_step_uses_each_loss_for_its_own_network_before_any_update():
    """Official order, gradient-wise: D learns from its loss only; G's loss goes through the pre-step D."""
    method = tiny(0, stage="edge")
    reference = copy.deepcopy(method)
    images, masks = batch()
    losses = reference.stage_losses(images, masks)
    d_parameters = list(reference.edge_discriminator.parameters())
    g_parameters = list(reference.edge_generator.parameters())
    expected_d = torch.autograd.grad(losses["edge_d"], d_parameters, retain_graph=True)
    expected_g = torch.autograd.grad(losses["edge_g_adv"] + losses["edge_g_fm"], g_parameters)
    method.train_step({"image": images, "mask": masks})
    for parameter, expected in zip(method.edge_discriminator.parameters(), expected_d):
        torch.testing.assert_close(parameter.grad, expected)
    for parameter, expected in zip(method.edge_generator.parameters(), expected_g):
        torch.testing.assert_close(parameter.grad, expected)


def test_l1_term_is_divided_by_the_hole_fraction(monkeypatch):
    method = tiny(0, stage="inpaint")
    monkeypatch.setattr(method, "feature_losses", lambda *args: (torch.zeros(()), torch.zeros(())))
    images, masks = batch()
    edges = gray_and_edges(images)[1]
    losses = method.inpaint_losses(images, edges, masks)
    predicted = method.inpaint_generator(torch.cat((images * (1 - masks) + masks, edges), 1))
    expected = (predicted - images).abs().mean() / masks.mean()
    torch.testing.assert_close(losses["inpaint_g_l1"], expected)


def test_bad_options_raise_user_errors():
    with pytest.raises(UserError, match="stage"):
        ec_tiny(stage="everything")
    with pytest.raises(UserError, match="feature_network"):
        ec_tiny(feature_network="vgg16")
    with pytest.raises(UserError):
        ec_tiny(no_such_option=1)


# ------------------------------------------------------------------ gray + Canny made on the host
def test_host_made_edges_give_the_same_training_step_and_inference():
    """The training loop's data path (and evaluation's) computes gray + Canny with ``host_preprocessing`` on the
    CPU batch; the step and the prediction are the same as when the method computes them itself."""
    images, masks = batch()
    method = tiny(0, stage="edge")  # the stage without the pretrained loss network: fast
    reference = copy.deepcopy(method)
    train_inputs = method.host_preprocessing("train")(images, masks)
    assert torch.equal(train_inputs["edges"], gray_and_edges(images, sigma=2.0)[1])  # whole image in training
    losses = method.train_step({"image": images, "mask": masks, **train_inputs})
    expected = reference.train_step({"image": images, "mask": masks})
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(method.parameters(), reference.parameters()))
    inference_inputs = method.host_preprocessing("inpaint")(images, masks)
    assert torch.equal(inference_inputs["edges"], gray_and_edges(images, sigma=2.0, masks=masks)[1])  # known pixels
    assert torch.equal(method.inpaint(images, masks, **inference_inputs), method.inpaint(images, masks))
