"""SAHN (sahn/): shapes, masking, losses, frozen teacher, ablations, checkpoints, seeded training."""
import dataclasses

import pytest
import torch
from torchvision.ops import deform_conv2d

import bench
from bench.config import TrainConfig
from bench.data.datasets import load_image_set
from bench.errors import UserError
from bench.nn.layers import SPADE, DeformableConv2d, gather_deform_conv2d
from bench.nn.losses import semantic_prior_loss
from bench.run.train import train
from sahn.model import PAPER_PARAMETERS, SAHN, SAHNConfig, broken_image, sahn_paper, sahn_tiny, upsample_image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small tensors gain nothing from a second thread, and on a shared 2-core machine an
    oversubscribed OpenMP pool makes each op wait for a descheduled thread (10× slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny(seed: int = 0, **overrides) -> SAHN:
    torch.manual_seed(seed)
    return sahn_tiny(**overrides)


def batch(size: int = 32, count: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, 1, size, size)
    masks[..., size // 4: size // 2, size // 4: 3 * size // 4] = 1
    return images, masks


@pytest.fixture(scope="module")
def tiny() -> SAHN:
    return make_tiny()


# --------------------------------------------------------------------- shapes and masking
def test_registry_creates_sahn_with_recorded_substitutes():
    torch.manual_seed(0)
    method = bench.create_method("sahn_tiny", alpha=0.4)
    assert isinstance(method, SAHN) and method.name == "sahn_tiny" and method.paper_name == "SAHN"
    assert method.config.alpha == 0.4
    assert "TResNet-L" in method.substitutions["teacher"] and "VGG16" in method.substitutions["perceptual"]
    assert set(method.pretrained) == {"teacher", "perceptual"}


def test_output_shapes(tiny):
    images, masks = batch(32)
    out = tiny.inpaint(images, masks)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    generated = tiny.generator(broken_image(images, masks), masks)
    goals = tiny.teacher(upsample_image(images))
    assert [p.shape for p in generated.priors] == [g.shape for g in goals]
    assert [p.shape[-1] for p in generated.priors] == [32, 16, 8]  # scales H, H/2, H/4
    odd_images, odd_masks = torch.rand(1, 3, 30, 34), torch.zeros(1, 1, 30, 34)
    assert tiny.inpaint(odd_images, odd_masks).shape == (1, 3, 30, 34)  # padded inside, cropped back


def test_hole_content_never_reaches_the_generator(tiny):
    images, masks = batch(32)
    other = images.clone()
    other[masks.expand_as(images) > 0] = torch.rand(int(masks.sum().item()) * 3)
    assert torch.equal(tiny.inpaint(images, masks), tiny.inpaint(other, masks))
    assert torch.equal(broken_image(images, masks)[masks.expand_as(images) > 0],
                       torch.ones(int(masks.sum().item()) * 3))  # the paper's eq. 1: holes are white


def test_known_pixels_are_preserved_in_the_restored_image(tiny):
    images, masks = batch(32)
    restored = tiny.restored_image(images, masks, torch.rand_like(images))
    known = masks.expand_as(images) == 0
    assert torch.equal(restored[known], images[known])
    hole_output = torch.full_like(images, 0.25)
    assert torch.all(tiny.restored_image(images, masks, hole_output)[~known] == 0.25)


def test_inpaint_leaves_the_training_mode_alone(tiny):
    tiny.train()
    tiny.inpaint(*batch(16))
    assert tiny.training and tiny.generator.training
    tiny.eval()


# --------------------------------------------------------------------- losses
def test_prior_loss_uses_alpha_on_the_hole(tiny):
    images, _ = batch(32)
    full_hole = torch.ones(2, 1, 32, 32)
    output = tiny.generator(broken_image(images, full_hole), full_hole)
    goals = tiny.teacher(upsample_image(images))
    fake_logits = torch.zeros(2, 1, 2, 2)
    with_alpha = tiny.losses(images, full_hole, output, goals, fake_logits)["prior"]
    without = semantic_prior_loss(output.priors, goals, full_hole, 0.0)
    # every pixel a hole: the prior loss is exactly (1 + α) times the unweighted L1
    assert with_alpha.item() == pytest.approx((1 + tiny.config.alpha) * without.item(), rel=1e-6)


def test_total_loss_is_the_weighted_sum(tiny):
    images, masks = batch(32)
    output = tiny.generator(broken_image(images, masks), masks)
    goals = tiny.teacher(upsample_image(images))
    terms = tiny.losses(images, masks, output, goals, torch.zeros(2, 1, 2, 2))
    c = tiny.config
    expected = c.w_rec * terms["rec"] + c.w_fm * terms["fm"] + c.w_adv * terms["adv"] + c.w_prior * terms["prior"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert (c.w_rec, c.w_fm, c.w_adv, c.w_prior) == (1.0, 0.3, 0.1, 0.5)  # the paper's §4.1


def test_train_step_reports_every_loss_term():
    method = make_tiny()
    images, masks = batch(32)
    losses = method.train_step({"image": images, "mask": masks})
    assert set(losses) == {"rec", "fm", "adv", "prior", "d", "total"}
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad and v == v for v in losses.values())


# --------------------------------------------------------------------- frozen networks
def test_teacher_is_frozen_unsaved_and_outside_the_optimisers():
    method = make_tiny()
    teacher = method.teacher
    optimised = {id(p) for opt in method.optimizers.values() for group in opt.param_groups for p in group["params"]}
    frozen = list(teacher.parameters()) + list(method.perceptual.parameters())
    assert frozen and not any(id(p) in optimised for p in frozen)
    assert not any(p.requires_grad for p in frozen)
    assert all(k.startswith(("generator.", "discriminator.")) for k in method.state_dict())
    before = [p.clone() for p in teacher.parameters()]
    buffers = [b.clone() for b in teacher.buffers()]
    method.train()
    method.train_step(dict(zip(("image", "mask"), batch(32))))
    assert not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, teacher.buffers()))  # BN statistics too


def test_parameter_counts_exclude_the_pretrained_networks(tiny):
    counts = tiny.num_parameters()
    assert set(counts) == {"generator", "discriminator"}
    assert counts["generator"] == sum(p.numel() for p in tiny.generator.parameters())
    assert sum(counts.values()) == sum(p.numel() for p in tiny.parameters())


# --------------------------------------------------------------------- ablations and options
def _shapes(method: SAHN) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in method.generator.state_dict().items()}


@pytest.mark.parametrize("switch", [{"use_unet": False}, {"use_msf": False}, {"deformable_scales": ()}])
def test_each_ablation_switch_changes_the_network(tiny, switch):
    ablated = make_tiny(**switch)
    assert _shapes(ablated) != _shapes(tiny)
    images, masks = batch(32)
    assert ablated.inpaint(images, masks).shape == images.shape


def test_ablation_switches_do_what_they_say(tiny):
    no_unet = make_tiny(use_unet=False).generator.prior_mapper
    assert tiny.generator.prior_mapper.fuse[1].body[1].in_channels == 16 + 16  # F_pyr ⊕ F_s skip
    assert no_unet.fuse[1].body[1].in_channels == 16  # upsampled F_pyr only
    no_msf = make_tiny(use_msf=False).generator
    assert set(no_msf.structure) == {"3"} and set(tiny.generator.structure) == {"1", "2", "3"}
    deformable = [m for m in tiny.generator.modules() if isinstance(m, DeformableConv2d)]
    assert len(deformable) == 2 * tiny.config.msf_blocks[2]  # two convs per block, coarsest scale only
    assert not any(isinstance(m, DeformableConv2d) for m in make_tiny(deformable_scales=()).modules())


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="alphaa"):
        sahn_tiny(alphaa=0.3)
    with pytest.raises(UserError, match="deformable_scales"):
        sahn_tiny(deformable_scales=(4,))
    with pytest.raises(UserError, match="msf_blocks"):
        sahn_tiny(msf_blocks=(1, 1))
    with pytest.raises(UserError, match="teacher"):
        sahn_tiny(teacher="vgg")


# --------------------------------------------------------------------- checkpoints
def test_save_then_load_gives_identical_outputs(tmp_path):
    first = make_tiny(seed=0)
    first.train_step(dict(zip(("image", "mask"), batch(32))))  # move away from the initialisation
    first.save(tmp_path / "sahn.pt")
    second = make_tiny(seed=1)
    images, masks = batch(32, seed=3)
    assert not torch.equal(first.inpaint(images, masks), second.inpaint(images, masks))
    second.load(tmp_path / "sahn.pt")
    assert torch.equal(first.inpaint(images, masks), second.inpaint(images, masks))


def test_a_harness_checkpoint_decides_the_architecture_it_loads_into(tmp_path):
    saved = make_tiny()
    saved.save(tmp_path / "tiny.pt")
    loaded = make_tiny(use_msf=False).load(tmp_path / "tiny.pt")
    assert loaded.config.use_msf is True
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    broken = {k: v[..., :1] if v.ndim == 4 else v for k, v in saved.state_dict().items()}
    torch.save({"format": "sahn-bench/1", "method": saved.name, "config": saved.config_dict(), "state_dict": broken},
               tmp_path / "broken.pt")
    with pytest.raises(UserError, match="does not match"):
        make_tiny().load(tmp_path / "broken.pt")


# --------------------------------------------------------------------- seeded training
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return load_image_set("faces", "train", image_size=64, cache_dir=tmp_path_factory.mktemp("suites"))


def _train_twenty_steps(faces) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    method = make_tiny(seed=0)
    result = train(method, faces, TrainConfig(steps=20, batch_size=4, seed=0, checkpoint_every=100), progress=False)
    return result.history, method.state_dict()


def test_twenty_seeded_steps_lower_the_reconstruction_loss_bit_identically(faces):
    history, weights = _train_twenty_steps(faces)
    assert len(history) == 20
    rec = [entry["rec"] for entry in history]
    assert sum(rec[-5:]) / 5 < sum(rec[:5]) / 5
    repeat_history, repeat_weights = _train_twenty_steps(faces)
    assert repeat_history == history
    assert weights.keys() == repeat_weights.keys()
    assert all(torch.equal(weights[k], repeat_weights[k]) for k in weights)


def test_resumed_training_matches_an_uninterrupted_run(faces, tmp_path):
    """Optimiser moments and spectral-norm vectors are part of the training state."""
    config = TrainConfig(steps=3, batch_size=2, seed=0, checkpoint_every=2)
    uninterrupted = make_tiny(seed=0)
    expected = train(uninterrupted, faces, config, progress=False).history
    interrupted = make_tiny(seed=0)
    train(interrupted, faces, dataclasses.replace(config, steps=2), checkpoint_path=tmp_path / "state.pt", progress=False)
    resumed = make_tiny(seed=5)  # different initial weights: everything must come from the checkpoint
    result = train(resumed, faces, config, checkpoint_path=tmp_path / "state.pt", progress=False)
    assert result.resumed_from == 2 and result.history == expected
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))


# --------------------------------------------------------------------- layers SAHN relies on
@pytest.mark.parametrize("dilation,offset_scale", [(1, 0.0), (1, 2.5), (2, 1.5)])
def test_gather_deformable_conv_equals_torchvision(dilation, offset_scale):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, 9, generator=generator, requires_grad=True)
    weight = torch.randn(4, 5, 3, 3, generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator, requires_grad=True)
    offset = (torch.randn(2, 18, 11, 9, generator=generator) * offset_scale).requires_grad_()
    ours = gather_deform_conv2d(x, offset, weight, bias, padding=dilation, dilation=dilation)
    reference = deform_conv2d(x, offset, weight, bias, padding=dilation, dilation=dilation)
    assert torch.allclose(ours, reference, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (x, offset, weight, bias))
    reference_grads = torch.autograd.grad(reference.square().sum(), (x, offset, weight, bias))
    for a, b in zip(grads, reference_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_fresh_deformable_conv_is_a_plain_conv():
    torch.manual_seed(0)
    layer = DeformableConv2d(3, 4)
    x = torch.randn(1, 3, 8, 8)
    plain = torch.nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)
    assert torch.allclose(layer(x), plain, atol=1e-5)


def test_spade_modulates_instance_normalised_features():
    torch.manual_seed(0)
    spade = SPADE(channels=3, condition_channels=2, hidden_channels=4)
    x = torch.randn(2, 3, 8, 8) * 5 + 2
    condition = torch.randn(2, 2, 4, 4)  # resized to x inside
    for conv in (spade.gamma, spade.beta):
        torch.nn.init.zeros_(conv.weight)
    torch.nn.init.constant_(spade.gamma.bias, 1.0)  # γ = 1 → scale 1 + γ = 2
    torch.nn.init.constant_(spade.beta.bias, 0.5)
    normalised = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(spade(x, condition), 2 * normalised + 0.5, atol=1e-4)


# --------------------------------------------------------------------- the paper's size
def test_sahn_paper_instantiates_near_the_papers_size():
    torch.manual_seed(0)
    method = sahn_paper()
    total = sum(method.num_parameters().values())
    assert abs(total - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05  # the paper: 98.7M
    assert method.config == SAHNConfig()
    assert dataclasses.asdict(method.config)["deformable_scales"] == (1, 2, 3)
