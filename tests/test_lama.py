"""LaMa adapter: official sizes and key layout, official checkpoints, predict-style padding, training step."""
import collections
import copy
import math
import os

import numpy as np
import pytest
import torch

from bench import create_method
from bench.errors import CheckpointError, WeightsUnavailable
from bench.checkpoint_format import safe_torch_load
from baselines.lama import (InertObject, LaMa, ResNet50Dilated, big_lama, lama_fourier, lama_tiny,
                            load_ade20k_encoder, load_checkpoint_inertly, pad_to_multiple)

# docs/official-sources.md: sums of p.numel() over the official classes at commit 786f593.
OFFICIAL_LAMA_FOURIER_GENERATOR = 27_048_835
OFFICIAL_BIG_LAMA_GENERATOR = 50_975_875
OFFICIAL_PIX2PIXHD_DISCRIMINATOR = 6_962_369
# Sum of p.numel() of the official ResnetDilated(resnet50(), dilate_scale=8) (models/ade20k), instantiated on CPU.
OFFICIAL_ADE20K_ENCODER = 23_631_808

FOREIGN_CALLS = []


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The networks here are tiny: on a shared 2-core machine thread hand-offs cost more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def record_foreign_call(*args):
    FOREIGN_CALLS.append(args)


class ForeignConfig:
    """Stands for an object a Lightning checkpoint pickles (an OmegaConf DictConfig): unpickling it for real
    would call ``record_foreign_call``."""

    def __reduce__(self):
        return record_foreign_call, ("hyper_parameters unpickled",)


class ForeignCallback:
    pass


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return lama_tiny(perceptual_network="none", **overrides)


def scramble_batchnorm_statistics(method, seed):
    """Non-default running statistics, so eval-mode outputs depend on every buffer being loaded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in method.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)


def lightning_checkpoint(method):
    """The layout of LaMa's best.ckpt (PyTorch Lightning 1.2.9): the training module's state_dict, which also
    holds the frozen loss network and evaluators, plus foreign objects in the hyper-parameters and callbacks."""
    state = collections.OrderedDict(method.state_dict())
    state["loss_resnet_pl.impl.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    state["val_evaluator.scores.lpips.net.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    return {"epoch": 39, "global_step": 1_000_000, "pytorch-lightning_version": "1.2.9",
            "callbacks": {ForeignCallback: {"best_model_score": torch.tensor(0.91)}},
            "loops": collections.defaultdict(list, {"fit": [1, 2]}),
            "optimizer_states": [method.optimizers["generator"].state_dict()], "lr_schedulers": [],
            "state_dict": state, "hparams_name": "kwargs", "hyper_parameters": ForeignConfig(),
            "hparams_type": ForeignConfig}


def random_batch(seed, size=64, batch=4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    masks = (torch.rand(batch, 1, size, size, generator=generator) > 0.6).float()
    return {"image": images, "mask": masks}


# --------------------------------------------------------------------------- sizes and key layout
@pytest.mark.parametrize("constructor, generator_parameters", [(lama_fourier, OFFICIAL_LAMA_FOURIER_GENERATOR),
                                                               (big_lama, OFFICIAL_BIG_LAMA_GENERATOR)])
def test_paper_variants_have_the_official_parameter_counts(constructor, generator_parameters):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        method = constructor(perceptual_network="none")
    assert method.num_parameters() == {"generator": generator_parameters,
                                       "discriminator": OFFICIAL_PIX2PIXHD_DISCRIMINATOR}
    assert method.paper_name == "LaMa-Fourier"


def test_state_dict_uses_the_official_key_layout():
    with torch.device("meta"):
        keys = set(big_lama(perceptual_network="none").state_dict())
    # nn.Sequential "model": 0 pad, 1 first FFC, 2-4 downsamplings, 5-22 FFC blocks, 23 concat,
    # 24-32 (ConvTranspose, BN, ReLU) x3, 33 pad, 34 conv, 35 sigmoid
    expected = {"generator.model.1.ffc.convl2l.weight", "generator.model.1.bn_l.running_var",
                "generator.model.4.ffc.convl2g.weight", "generator.model.4.bn_g.num_batches_tracked",
                "generator.model.5.conv1.ffc.convg2g.conv1.0.weight",
                "generator.model.5.conv1.ffc.convg2g.fu.conv_layer.weight",
                "generator.model.22.conv2.ffc.convg2l.weight", "generator.model.24.weight",
                "generator.model.25.running_mean", "generator.model.34.bias",
                "discriminator.model0.0.weight", "discriminator.model4.1.running_var", "discriminator.model5.0.bias"}
    assert expected <= keys
    # no global branch before the last downsampling, no LFU, nothing beyond the official layers
    assert not any(k.startswith(("generator.model.1.ffc.convl2g", "generator.model.3.bn_g", "generator.model.35",
                                 "discriminator.model6")) or ".lfu." in k for k in keys)


# --------------------------------------------------------------------------- official checkpoints
def test_lightning_checkpoint_loads_strictly_and_reproduces_the_saved_model(tmp_path):
    source = tiny(seed=1)
    scramble_batchnorm_statistics(source, seed=2)
    release = tmp_path / "big-lama"
    (release / "models").mkdir(parents=True)
    checkpoint = release / "models" / "best.ckpt"
    torch.save(lightning_checkpoint(source), checkpoint)
    with pytest.raises(CheckpointError, match="ForeignC"):  # the plain weights-only loader refuses the file
        safe_torch_load(checkpoint)

    images = torch.rand(2, 3, 40, 48)
    masks = (torch.rand(2, 1, 40, 48) > 0.5).float()
    expected = source.inpaint(images, masks)
    for path in (checkpoint, release):  # the file, or the official release folder
        target = tiny(seed=3)
        assert not torch.equal(target.inpaint(images, masks), expected)
        target.load(path)
        assert torch.equal(target.inpaint(images, masks), expected)
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
        assert target.ignored_checkpoint_prefixes == ["loss_resnet_pl", "val_evaluator"]
    assert FOREIGN_CALLS == []  # the pickled reduce call was never executed


def test_foreign_objects_become_inert_placeholders(tmp_path):
    path = tmp_path / "best.ckpt"
    torch.save(lightning_checkpoint(tiny()), path)
    payload = load_checkpoint_inertly(path)
    assert isinstance(payload["hyper_parameters"], InertObject)
    assert payload["hyper_parameters"].qualified_name.endswith("record_foreign_call")
    assert payload["loops"] == {"fit": [1, 2]}  # a defaultdict's items survive as a plain dict
    (callback_key, callback_state), = payload["callbacks"].items()
    assert issubclass(callback_key, InertObject) and torch.equal(callback_state["best_model_score"],
                                                                 torch.tensor(0.91))
    assert FOREIGN_CALLS == []


def test_checkpoint_calling_a_blocked_function_is_refused(tmp_path):
    evidence = tmp_path / "executed"

    class RunsShell:
        def __reduce__(self):
            return os.system, (f"touch {evidence}",)

    path = tmp_path / "evil.ckpt"
    payload = lightning_checkpoint(tiny())
    payload["hyper_parameters"] = RunsShell()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="system"):
        tiny().load(path)
    assert not evidence.exists()


def test_checkpoint_with_a_missing_key_fails_naming_it(tmp_path):
    payload = lightning_checkpoint(tiny())
    missing = "generator.model.5.conv1.ffc.convg2g.fu.conv_layer.weight"
    del payload["state_dict"][missing]
    payload["state_dict"]["discriminator.model9.0.weight"] = torch.zeros(1)
    path = tmp_path / "partial.ckpt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="missing keys: " + missing.replace(".", r"\.")) as error:
        tiny().load(path)
    assert "unexpected keys: discriminator.model9.0.weight" in str(error.value)


def test_checkpoint_decides_depth_and_widths(tmp_path):
    """A file of another depth or width loads as it is: block count, ngf, global ratio and the discriminator
    come from its tensors, so a lama_tiny given a 3-block file becomes a 3-block LaMa."""
    source = tiny(seed=1, n_blocks=3, ngf=8, ratio_g=0.5, disc_ndf=8, disc_n_layers=3)
    scramble_batchnorm_statistics(source, seed=5)
    path = tmp_path / "deeper.ckpt"
    torch.save(lightning_checkpoint(source), path)
    info = LaMa.inspect_official(path)
    assert info.config == {"ngf": 8, "n_downsampling": 3, "n_blocks": 3, "ratio_g": 0.5, "max_features": 1024,
                           "disc_ndf": 8, "disc_n_layers": 3}
    assert info.variant == "lama_fourier" and info.release == "a LaMa release (3 FFC blocks)"
    target = tiny(seed=2).load(path)
    assert target.config.n_blocks == 3 and target.name == "lama_tiny"
    images, masks = torch.rand(1, 3, 32, 32), (torch.rand(1, 1, 32, 32) > 0.5).float()
    assert torch.equal(target.inpaint(images, masks), source.inpaint(images, masks))
    # a bottleneck narrower than ngf·2^n (max_features) and an odd global split are read back exactly
    odd = tiny(seed=1, ngf=8, max_features=48, ratio_g=0.7)
    torch.save(lightning_checkpoint(odd), path)
    config = LaMa.inspect_official(path).config
    assert config["max_features"] == 48
    assert int(48 * config["ratio_g"]) == int(48 * 0.7)
    assert tiny(seed=2).load(path).generator.state_dict().keys() == odd.generator.state_dict().keys()


def test_checkpoint_without_generator_is_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="no generator.* keys.*encoder"):
        tiny().load(path)


def test_generator_only_checkpoint_keeps_the_discriminator(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    discriminator_before = copy.deepcopy(target.discriminator.state_dict())
    state = {k: v for k, v in source.state_dict().items() if k.startswith("generator.")}
    path = tmp_path / "generator.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.warns(UserWarning, match="a generator-only release"):
        target.load(path)
    assert all(torch.equal(v, target.discriminator.state_dict()[k]) for k, v in discriminator_before.items())
    assert all(torch.equal(v, target.generator.state_dict()[k.removeprefix("generator.")]) for k, v in state.items())


# --------------------------------------------------------------------------- harness format
def test_harness_save_load_round_trip(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    scramble_batchnorm_statistics(source, seed=4)
    source.train_step(random_batch(0, size=32, batch=2))  # weights and BN statistics change; all must round-trip
    path = tmp_path / "lama.pt"
    source.save(path)
    assert safe_torch_load(path)["method"] == "lama_tiny"
    target.load(path)
    images, masks = torch.rand(1, 3, 32, 32), (torch.rand(1, 1, 32, 32) > 0.5).float()
    assert torch.equal(target.inpaint(images, masks), source.inpaint(images, masks))


def test_frozen_loss_network_stays_out_of_state_dict_and_moves_with_the_method():
    torch.manual_seed(0)
    method = lama_tiny()
    keys_before = set(method.state_dict())
    loss = method.perceptual_loss()
    assert set(method.state_dict()) == keys_before and set(method.num_parameters()) == {"generator", "discriminator"}
    method.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in loss.network.parameters())
    assert all(not p.requires_grad for p in loss.network.parameters())


# --------------------------------------------------------------------------- inference as bin/predict.py
@pytest.mark.parametrize("shape", [(3, 37, 50), (1, 5, 3), (3, 8, 16)])
def test_padding_matches_numpy_symmetric_padding(shape):
    array = np.random.default_rng(0).random(shape, dtype=np.float32)
    height, width = shape[1:]
    expected = np.pad(array, ((0, 0), (0, -height % 8), (0, -width % 8)), mode="symmetric")
    assert np.array_equal(pad_to_multiple(torch.from_numpy(array)[None], 8)[0].numpy(), expected)


def test_inpaint_pads_odd_sizes_and_crops_back():
    method = tiny()
    scramble_batchnorm_statistics(method, seed=5)
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(2, 3, 37, 50, generator=generator)
    masks = (torch.rand(2, 1, 37, 50, generator=generator) > 0.5).float()
    output = method.inpaint(images, masks)
    assert output.shape == images.shape and 0 <= output.min() and output.max() <= 1
    # the same pass written out with numpy's padding
    padded_images = torch.from_numpy(np.pad(images.numpy(), ((0, 0), (0, 0), (0, 3), (0, 6)), mode="symmetric"))
    padded_masks = torch.from_numpy(np.pad(masks.numpy(), ((0, 0), (0, 0), (0, 3), (0, 6)), mode="symmetric"))
    method.generator.eval()
    with torch.no_grad():
        expected = method.generator(torch.cat([padded_images * (1 - padded_masks), padded_masks], 1))
    assert torch.equal(output, expected[..., :37, :50])
    method.train()
    method.inpaint(images, masks)
    assert method.generator.training  # inpaint uses eval mode but restores the mode it found


def test_inpaint_binarises_soft_masks_as_predict():
    method = tiny()
    images = torch.rand(1, 3, 16, 16)
    soft = torch.rand(1, 1, 16, 16) * 0.5
    assert torch.equal(method.inpaint(images, soft), method.inpaint(images, (soft > 0).float()))


# --------------------------------------------------------------------------- training
def two_seeded_steps():
    torch.manual_seed(0)
    method = lama_tiny()
    losses = [method.train_step(random_batch(step, size=32, batch=2)) for step in range(2)]
    return method, losses


def test_train_step_is_finite_deterministic_and_updates_both_networks():
    torch.manual_seed(0)
    initial = lama_tiny(perceptual_network="none").state_dict()
    first, first_losses = two_seeded_steps()
    second, second_losses = two_seeded_steps()
    assert first_losses == second_losses
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    for losses in first_losses:
        assert {"gen_l1", "gen_adv", "gen_fm", "gen_resnet_pl", "discr_adv", "discr_real_gp"} <= set(losses)
        assert all(math.isfinite(v) for v in losses.values())
    trained = first.state_dict()
    for network in ("generator.model.1.ffc.convl2l.weight", "discriminator.model0.0.weight"):
        assert not torch.equal(trained[network], initial[network])


def test_perceptual_substitute_is_recorded_and_can_be_disabled():
    torch.manual_seed(0)
    assert "EfficientNet-Lite0" in lama_tiny().substitutions["perceptual"]
    method = tiny()
    assert method.substitutions == {}
    assert "gen_resnet_pl" not in method.train_step(random_batch(0, size=32, batch=2))


def test_official_perceptual_network_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailable, match="encoder_epoch_20.pth"):
        lama_tiny(perceptual_network="ade20k_resnet50dilated",
                  perceptual_weights_path=str(tmp_path / "encoder_epoch_20.pth"))


def test_ade20k_encoder_loads_the_released_format(tmp_path):
    torch.manual_seed(0)
    encoder = ResNet50Dilated()
    assert sum(p.numel() for p in encoder.parameters()) == OFFICIAL_ADE20K_ENCODER
    # the released file: keys as the encoder's, without BN counters (older PyTorch)
    state = {k: v for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "encoder_epoch_20.pth"
    torch.save(state, path)
    method = lama_tiny(perceptual_network="ade20k_resnet50dilated", perceptual_weights_path=str(path))
    assert "perceptual" not in method.substitutions
    features = method.perceptual_loss().network(torch.rand(1, 3, 32, 48))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 8, 12), (512, 4, 6), (1024, 4, 6), (2048, 4, 6)]
    del state["layer4.2.conv3.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layer4\.2\.conv3\.weight"):
        load_ade20k_encoder(path)


def test_registry_creates_the_variants():
    method = create_method("lama_tiny", perceptual_network="none", n_blocks=1)
    assert isinstance(method, LaMa) and method.name == "lama_tiny" and method.config.n_blocks == 1
