"""SPL and SPN (baselines.spl): official sizes and key names, official DDP checkpoints, region normalisation,
the prior learner's input, the official prior loss and schedule, training and inference."""
import gc
import warnings

import pytest
import torch

from baselines.spl import (RegionNormB, RegionNormL, official_schedule, semantic_prior_loss, spl, spl_tiny, spn,
                           spn_tiny)
from bench import create_method
from bench.errors import CheckpointError, UserError, WeightsUnavailable

SN = ("weight_orig", "weight_u", "weight_v")  # hook-based spectral norm, as in the official D_Net


# ------------------------------------------------------------------ official key names (networks.py, rn.py)
def conv(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def spade(prefix: str) -> list[str]:
    """rn.py SPADE: mlp_shared (conv + ReLU), mlp_gamma, mlp_beta; the parameter-free norm has no state."""
    return conv(f"{prefix}.mlp_shared.0") + conv(f"{prefix}.mlp_gamma") + conv(f"{prefix}.mlp_beta")


def rn_l(prefix: str) -> list[str]:
    """rn.py RN_L: only its SelfAware_Affine ``sa`` has weights (conv1 without bias, gamma_conv, beta_conv)."""
    return [f"{prefix}.sa.conv1.weight"] + conv(f"{prefix}.sa.gamma_conv") + conv(f"{prefix}.sa.beta_conv")


def official_shared_keys() -> list[str]:
    """G_Net's keys up to feature_mapping, identical in SPL and SPN, in registration order."""
    keys = []
    for index in (1, 2, 3):
        keys += conv(f"encoder_conv{index}")
        keys += [f"encoder_in{index}.{side}_{p}" for side in ("foreground", "background") for p in ("gamma", "beta")]
    for block in range(8):  # ResnetBlock_Spade: SPADE at 0 and 4, convs at 3 and 7
        keys += spade(f"middle.{block}.conv_block.0") + conv(f"middle.{block}.conv_block.3")
        keys += spade(f"middle.{block}.conv_block.4") + conv(f"middle.{block}.conv_block.7")
    for index in (1, 2, 3, 4):
        keys += conv(f"encoder_conv{index}_sm")
    keys += conv("encoder_sm_out")
    for block in range(16):  # RDB: 6 dense layers + local feature fusion
        keys += [k for layer in range(6) for k in conv(f"rdbs.{block}.layers.{layer}.conv")] + conv(f"rdbs.{block}.lff")
    keys += conv("gff.0") + conv("gff.1")
    for block in range(4):  # ResnetBlock without norm: convs at 1 and 4
        keys += conv(f"feature_recon.{block}.conv_block.1") + conv(f"feature_recon.{block}.conv_block.4")
    return keys + conv("feature_mapping")


def official_spl_keys() -> list[str]:
    decoder = conv("decoder.0") + rn_l("decoder.2") + conv("decoder.4") + rn_l("decoder.6") + conv("decoder.9")
    return official_shared_keys() + decoder


def official_spn_keys() -> list[str]:
    pyramid = []
    for index in (0, 3, 4, 7):  # convs at 0 and 4, ResnetBlock_withshort at 3 and 7
        if index in (3, 7):
            pyramid += (conv(f"feature_recon_decoder.{index}.conv_block.1") + conv(f"feature_recon_decoder.{index}.conv_block.4")
                        + conv(f"feature_recon_decoder.{index}.shortcut.1"))
        else:
            pyramid += conv(f"feature_recon_decoder.{index}")
    heads = conv("feature_mapping_128") + conv("feature_mapping_256")
    decoder = []
    for index in (1, 3):  # ResnetBlock_Spade_MaskG: conv_block (SPADE 0, conv 2, SPADE 3, conv 5), conv_s, SPADE_s
        prefix = f"decoder.{index}"
        decoder += (spade(f"{prefix}.conv_block.0") + conv(f"{prefix}.conv_block.2") + spade(f"{prefix}.conv_block.3")
                    + conv(f"{prefix}.conv_block.5") + conv(f"{prefix}.conv_s") + spade(f"{prefix}.SPADE_s"))
    return official_shared_keys() + pyramid + heads + decoder + conv("decoder.6")


def official_discriminator_keys() -> list[str]:
    return [f"{block}.0.{s}" for block in ("conv1", "features", "conv2", "conv3", "conv4", "conv5") for s in SN]


@pytest.mark.parametrize("factory, generator_parameters, official_keys", [
    (spl, 45_597_223, official_spl_keys), (spn, 50_702_643, official_spn_keys)])
def test_paper_sizes_parameter_counts_and_key_names(factory, generator_parameters, official_keys):
    # counts from instantiating the official classes (docs/official-sources.md); the heads are TResNet-L's
    method = factory(teacher="tresnet_l")  # built without the teacher's weights file: it is only used to train
    try:
        assert method.num_parameters() == {"generator": generator_parameters, "discriminator": 2_763_776}
        assert list(method.generator.state_dict()) == official_keys()
        assert list(method.discriminator.state_dict()) == official_discriminator_keys()
        assert method.paper_name == factory.__name__.upper()
    finally:
        del method
        gc.collect()


def test_prior_heads_are_sized_for_the_configured_teacher():
    def heads(method):
        generator = method.generator
        names = [n for n in ("feature_mapping_256", "feature_mapping_128", "feature_mapping") if hasattr(generator, n)]
        return tuple(getattr(generator, n).out_channels for n in names)

    assert heads(spl_tiny()) == (40,)  # Lite0 stage 2 (stride 8)
    assert heads(spl_tiny(teacher="tresnet_l")) == (152,)  # TResNet-L layer2
    assert heads(spn_tiny()) == (16, 24, 40)
    assert heads(spn_tiny(teacher="tresnet_l")) == (76, 76, 152)  # conv1, layer1, layer2
    assert "efficientnet_lite0" in spl_tiny().substitutions["teacher"]
    assert "teacher" not in spl_tiny(teacher="tresnet_l").substitutions


def test_registry_and_option_errors():
    method = create_method("spn_tiny")
    assert method.name == "spn_tiny" and method.paper_name == "SPN"
    with pytest.raises(UserError, match="teacher='vgg'"):
        spl_tiny(teacher="vgg")
    with pytest.raises(UserError, match="image_channels"):
        spl_tiny(image_channels=(8, 16))


# ------------------------------------------------------------------ region normalisation (rn.py)
def region_statistics(values: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel: mean and population variance of ``values`` over the pixels where region is 1."""
    area = region.sum(dim=(2, 3))
    mean = (values * region).sum(dim=(2, 3)) / area
    variance = (((values - mean[..., None, None]) ** 2) * region).sum(dim=(2, 3)) / area
    return mean, variance


def test_rn_b_standardises_hole_and_known_regions_separately():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 8, 8, generator=generator) * 3 + 1
    features[:, :, 2:6, 1:5] += 10  # the hole's statistics differ from the rest
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    norm = RegionNormB(5)
    output = norm(features, mask)
    for region in (mask, 1 - mask):
        mean, variance = region_statistics(output, region)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(variance, torch.ones_like(variance), atol=1e-3, rtol=0)
    # the mask is nearest-resized to the features, and both betas shift every pixel (the official layer's form)
    with torch.no_grad():
        norm.foreground_beta.fill_(1.0)
        norm.background_beta.fill_(2.0)
    large_mask = mask.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(norm(features, large_mask), output + 3.0)


def test_rn_l_regions_come_from_its_self_aware_map():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 8, 8, generator=generator)
    norm = RegionNormL(threshold=0.5)
    with torch.no_grad():
        for layer in (norm.sa.conv1, norm.sa.gamma_conv, norm.sa.beta_conv):
            layer.weight.zero_()
        norm.sa.gamma_conv.bias.zero_()
        norm.sa.beta_conv.bias.zero_()
        norm.sa.conv1.weight[0, 0, 3, 3] = 50.0  # importance = sigmoid(50 · channel mean): ≥ 0.5 where mean ≥ 0
    region = (features.mean(dim=1, keepdim=True) >= 0).float()
    assert 0 < region.mean() < 1
    output = norm(features)
    for part in (region, 1 - region):
        mean, variance = region_statistics(output, part)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(variance, torch.ones_like(variance), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ helpers
def tiny(factory, seed: int, **overrides):
    torch.manual_seed(seed)
    return factory(**overrides)


def batch(size: int = 32, count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, 1, size, size)
    masks[:, :, size // 4: size // 2 + 3, size // 3: size - 5] = 1
    return images, masks


# ------------------------------------------------------------------ inference path
@pytest.mark.parametrize("factory", [spl_tiny, spn_tiny])
def test_prior_learner_sees_the_broken_image_and_mask_nearest_upsampled(factory):
    method = tiny(factory, 0)
    images, masks = batch(16, 1)
    seen = []
    handle = method.generator.encoder_conv1_sm.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        output = method.inpaint(images, masks)
    finally:
        handle.remove()
    broken = images * (1 - masks) + masks  # holes white
    expected = torch.cat((broken, masks), dim=1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(seen[0][..., 3:-3, 3:-3], expected, rtol=0, atol=0)  # inside the reflection pad
    assert output.shape == images.shape and 0 <= output.min() and output.max() <= 1


@pytest.mark.parametrize("factory", [spl_tiny, spn_tiny])
def test_inpaint_handles_sizes_that_are_not_multiples_of_four(factory):
    method = tiny(factory, 0)
    method.train()
    images = torch.rand(1, 3, 30, 34, generator=torch.Generator().manual_seed(4))
    masks = torch.zeros(1, 1, 30, 34)
    masks[..., 5:20, 7:25] = 1
    output = method.inpaint(images, masks)
    assert output.shape == images.shape and torch.isfinite(output).all()
    assert method.generator.training  # the caller's mode is restored


# ------------------------------------------------------------------ official checkpoints (main.py checkpoint())
def official_payload(source, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """InpaintingModel.state_dict() under DDP: both networks wrapped, plus the TResNet teacher and loss buffers."""
    payload = {f"generator.{prefix}{k}": v for k, v in source.generator.state_dict().items()}
    payload.update({f"discriminator.{prefix}{k}": v for k, v in source.discriminator.state_dict().items()})
    payload["tresnet_xL_hold.body.conv1.0.weight"] = torch.randn(76, 48, 3, 3)
    payload["adversarial_loss.real_label"] = torch.tensor(1.0)
    payload["adversarial_loss.fake_label"] = torch.tensor(0.0)
    return payload


@pytest.mark.parametrize("factory", [spl_tiny, spn_tiny])
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_checkpoint_round_trip_reproduces_outputs(tmp_path, factory, prefix):
    source, target = tiny(factory, 0, teacher="tresnet_l"), tiny(factory, 1, teacher="tresnet_l")
    images, masks = batch()
    assert not torch.allclose(source.inpaint(images, masks), target.inpaint(images, masks))
    torch.save(official_payload(source, prefix), tmp_path / "official.pt")
    target.load(tmp_path / "official.pt")  # no TResNet weights file needed: the teacher is for training only
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    for key, value in source.discriminator.state_dict().items():
        torch.testing.assert_close(target.discriminator.state_dict()[key], value, rtol=0, atol=0)


def test_partial_or_foreign_official_checkpoints_fail_naming_the_keys(tmp_path):
    source = tiny(spn_tiny, 0, teacher="tresnet_l")
    path = tmp_path / "official.pt"
    payload = official_payload(source)
    del payload["generator.module.middle.1.conv_block.3.weight"]
    del payload["generator.module.feature_mapping_128.bias"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"missing keys: feature_mapping_128\.bias, middle\.1\.conv_block\.3\.weight"):
        tiny(spn_tiny, 1, teacher="tresnet_l").load(path)

    payload = official_payload(source)
    payload["generator.module.extra.weight"] = torch.zeros(1)
    payload["ema.shadow"] = torch.zeros(1)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="ema.shadow"):
        tiny(spn_tiny, 1, teacher="tresnet_l").load(path)
    del payload["ema.shadow"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        tiny(spn_tiny, 1, teacher="tresnet_l").load(path)

    torch.save({"discriminator.module.conv1.0.weight_orig": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="no generator"):
        tiny(spn_tiny, 1, teacher="tresnet_l").load(path)
    del payload["generator.module.extra.weight"]
    torch.save(payload, path)
    # an SPN checkpoint is not an SPL one: the error says which method it loads into
    with pytest.raises(CheckpointError, match=r"an SPN release file .*loads into method spn_tiny, not spl_tiny"):
        tiny(spl_tiny, 1, teacher="tresnet_l").load(path)


@pytest.mark.parametrize("factory", [spl_tiny, spn_tiny])
def test_official_checkpoint_configures_the_teacher_and_the_sizes(tmp_path, factory):
    """No teacher= needed: the prior heads' widths say which teacher the file was trained for, and every width
    and block count is read from the tensors (a file of other sizes than the variant's loads as it is)."""
    source = tiny(factory, 0, teacher="tresnet_l", image_channels=(8, 8, 16), layout_channels=16, dense_blocks=1,
                  dense_layers=2, spade_blocks=1, spade_hidden=8, disc_channels=8)
    torch.save(official_payload(source), tmp_path / "official.pt")
    info = type(source).inspect_official(tmp_path / "official.pt")
    assert info.config["teacher"] == "tresnet_l" and info.config["image_channels"] == (8, 8, 16)
    assert (info.config["dense_blocks"], info.config["dense_layers"], info.config["spade_blocks"],
            info.config["spade_hidden"], info.config["disc_channels"]) == (1, 2, 1, 8, 8)
    assert info.variant == source.kind  # not the tiny preset's shapes: the paper variant
    target = tiny(factory, 1)  # configured with the Lite0 teacher
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load(tmp_path / "official.pt")
    assert not [w for w in caught if "generator-only" in str(w.message)]  # the file has its discriminator
    assert target.config.teacher == "tresnet_l" and "teacher" not in target.substitutions
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    # the tiny preset's shapes name the tiny variant
    torch.save(official_payload(tiny(factory, 0, teacher="tresnet_l")), tmp_path / "tiny.pt")
    assert type(source).inspect_official(tmp_path / "tiny.pt").variant == f"{source.kind}_tiny"


def test_generator_only_official_checkpoint_loads_with_a_warning(tmp_path):
    source = tiny(spl_tiny, 0, teacher="tresnet_l")
    payload = {k: v for k, v in official_payload(source).items() if not k.startswith("discriminator.")}
    torch.save(payload, tmp_path / "generator.pt")
    target = tiny(spl_tiny, 1, teacher="tresnet_l")  # already the file's configuration: nothing is rebuilt
    before = {k: v.clone() for k, v in target.discriminator.state_dict().items()}
    with pytest.warns(UserWarning, match="a generator-only release"):
        target.load(tmp_path / "generator.pt")
    assert all(torch.equal(v, before[k]) for k, v in target.discriminator.state_dict().items())
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)


def test_prior_heads_of_no_known_teacher_are_a_clear_error(tmp_path):
    payload = official_payload(tiny(spl_tiny, 0, teacher="tresnet_l"))
    payload["generator.module.feature_mapping.weight"] = torch.zeros(7, 32, 1, 1)
    torch.save(payload, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"prior heads predict \(7,\) channels, which fit no teacher"):
        tiny(spl_tiny, 1).load(tmp_path / "odd.pt")


def test_harness_checkpoint_round_trip_keeps_the_step_count(tmp_path):
    source, target = tiny(spl_tiny, 0), tiny(spl_tiny, 1)
    source.steps_done += 7
    source.save(tmp_path / "model.pt")
    target.load(tmp_path / "model.pt")
    images, masks = batch()
    torch.testing.assert_close(target.inpaint(images, masks), source.inpaint(images, masks), rtol=0, atol=0)
    assert int(target.steps_done) == 7


# ------------------------------------------------------------------ training (main.py)
def test_prior_loss_is_the_official_formula():
    """Per scale mean(|pred − target|·(1 + 3·m_s)); targets at another size and the mask nearest-resized."""
    generator = torch.Generator().manual_seed(5)
    masks = (torch.rand(2, 1, 16, 16, generator=generator) > 0.5).float()
    predictions = [torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)]
    targets = [torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)]
    # nearest ×2 up repeats each pixel; nearest ÷4 down keeps every 4th pixel from the top left
    fine_target = targets[0].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = ((predictions[0] - fine_target).abs() * (1 + 3 * masks)).mean()
    expected = expected + ((predictions[1] - targets[1]).abs() * (1 + 3 * masks[..., ::4, ::4])).mean()
    torch.testing.assert_close(semantic_prior_loss(predictions, targets, masks, 3.0), expected)
    with pytest.raises(ValueError, match="teacher"):
        semantic_prior_loss(predictions, [targets[0], targets[0]], masks, 3.0)


def test_official_schedule_in_steps():
    assert official_schedule("spl", 100, "paris") == {"lr_decay_step": 5000, "prior_cut_step": 6000}
    assert official_schedule("spn", 100, "Paris") == {"lr_decay_step": 5000, "prior_cut_step": 7000}
    assert official_schedule("spn", 100, "celeba") == {"lr_decay_step": 5000, "prior_cut_step": None}
    with pytest.raises(UserError):
        official_schedule("spl", 0, "paris")


def test_train_steps_follow_the_losses_and_the_step_schedule():
    method = tiny(spl_tiny, 0, lr_decay_step=1, prior_cut_step=2)
    images, masks = batch()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    learning_rates, losses = [], []
    for _ in range(3):
        losses.append(method.train_step({"image": images, "mask": masks}))
        learning_rates.append([g["lr"] for o in method.optimizers.values() for g in o.param_groups])
    assert learning_rates == [[1e-4, 1e-4], [1e-5, 1e-5], [1e-5, 1e-5]]
    for step, terms in enumerate(losses):
        assert all(torch.isfinite(v) for v in terms.values())  # detached 0-d tensors
        prior_weight = 1.0 if step < 2 else 0.0  # cut once two steps are done
        expected = float(terms["g_adv"]) + 10 * float(terms["g_l1"]) + prior_weight * float(terms["g_prior"])
        assert float(terms["g_total"]) == pytest.approx(expected, rel=1e-5)
        assert terms["g_prior"] > 0
    after = method.state_dict()
    assert int(after["steps_done"]) == 3
    for network in ("generator.encoder_conv1.weight", "generator.feature_mapping.weight",
                    "discriminator.conv1.0.weight_orig"):
        assert not torch.equal(before[network], after[network])
    assert "sha256:" in method.substitutions["teacher"]  # the built teacher's provenance is recorded


def test_spn_training_is_deterministic_and_resumable(tmp_path):
    images, masks = batch()
    step = {"image": images, "mask": masks}
    first, second = tiny(spn_tiny, 0), tiny(spn_tiny, 0)
    first_losses = [first.train_step(step) for _ in range(2)]
    assert [second.train_step(step) for _ in range(2)] == first_losses
    # through a file, as the harness resumes (in memory, Adam would share its moment tensors with ``first``)
    torch.save(first.training_state(), tmp_path / "state.pt")
    resumed = tiny(spn_tiny, 5)
    resumed.load_training_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert int(resumed.steps_done) == 2
    assert resumed.train_step(step) == first.train_step(step)


def test_the_schedule_follows_the_step_count_of_a_loaded_state(tmp_path):
    """The schedule reads a host-side copy of ``steps_done`` (a read of the buffer per step would wait for the
    device); loading a state re-reads the buffer."""
    images, masks = batch()
    first = tiny(spl_tiny, 0, lr_decay_step=1, prior_cut_step=1)
    first.train_step({"image": images, "mask": masks})
    torch.save(first.training_state(), tmp_path / "state.pt")
    resumed = tiny(spl_tiny, 0, lr_decay_step=1, prior_cut_step=1)
    assert resumed.schedule() == (1.0, resumed.config.prior_weight)  # no step done yet
    resumed.load_training_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.schedule() == first.schedule() == (first.config.lr_decay_factor, 0.0)


def test_the_paper_teacher_is_only_needed_for_training(tmp_path):
    method = tiny(spl_tiny, 0, teacher="tresnet_l", teacher_path=str(tmp_path / "missing.pth"))
    images, masks = batch()
    assert torch.isfinite(method.inpaint(images, masks)).all()
    with pytest.raises(WeightsUnavailable, match="missing.pth"):
        method.train_step({"image": images, "mask": masks})
