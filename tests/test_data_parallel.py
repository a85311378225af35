"""Data-parallel training computes what one process computes on the whole batch (gloo ranks on these CPUs, the
stand-in for NCCL): every GAN method's first steps, the losses normalised by a statistic of their batch (SAHN's
fake-patch count, EdgeConnect's hole fraction), and the synchronised batch norm, which GPUs use too because a
gradient penalty (LaMa's R1) differentiates it twice.

The ranks run in processes of torch.multiprocessing (spawned once for the module, results saved to files), not
under Ray Train: tests/test_ray_train.py covers Ray Train, and these need only the process group and the
training loop, which start in seconds."""
import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.config import TrainConfig
from bench.run.data_parallel import (SINGLE, Ranks, SynchronisedBatchNorm, data_parallel, synchronise_batch_norm,
                                 whole_batch_normaliser)
from bench.data.datasets import load_image_set
from bench.methods import create_method
from bench.run.train import train
from tiny_methods import write_folder_dataset

pytestmark = pytest.mark.timeout(600)

#: every GAN method's tiny variant, with its options here. LaMa's perceptual loss is off: its network (the
#: EfficientNet-Lite0 substitute, ReLU6 throughout, 1×1 at stride 32 of a 32² image) has a gradient that jumps
#: when an activation crosses a kink, and changing the prediction by 7e-7 (what batch norm's round-off does to
#: it) moved the loss's gradient by 2% (measured). Its batch-normalised form is tested on its own below.
GANS = {"ec_tiny": {}, "spl_tiny": {}, "spn_tiny": {}, "sahn_tiny": {}, "lama_tiny": {"perceptual_network": "none"},
        "ctsdg_tiny": {}}
SIZE, BATCH, STEPS = 32, 2, 2
#: Two ranks' halves of a batch give the whole batch's losses and gradients up to float32 round-off: the halves'
#: sums are added in another order. Relative to a loss, or to the largest gradient of the network a parameter
#: belongs to (a gradient that should be 0, such as a bias before instance norm, is pure round-off); seen: up to
#: 2.4e-5 (CTSDG's batch norm).
LOSS_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4

#: one train_step on a batch whose two halves have holes of very different sizes, with the options that make the
#: batch-normalised loss term the one that trains the generator (SAHN: the mask reading's adversarial term)
NORMALISED_LOSSES = {
    "sahn_tiny": (64, {"w_rec": 0.0, "w_fm": 0.0, "w_prior": 0.0, "w_adv": 1.0}),
    "ec_tiny": (32, {}),
}


# ------------------------------------------------------------------------------------ what a rank computes
def parameter_name(name: str) -> str:
    """A parameter's name in the method's own modules (a DDP-wrapped network adds ``module.`` after its name)."""
    network, _, rest = name.partition(".")
    return f"{network}.{rest.removeprefix('module.')}"


def gradients(method: nn.Module) -> dict[str, torch.Tensor]:
    return {parameter_name(name): parameter.grad.detach().clone() for name, parameter in method.named_parameters()
            if parameter.grad is not None}


def train_two_steps(name: str, images, ranks: Ranks) -> dict:
    """``name`` created with seed 0 and trained for :data:`STEPS` steps at this rank: every step's losses (averaged
    over the ranks) and, for each optimiser step of step 0, the gradients it was about to apply (averaged by DDP).

    Step 0 holds its updates back, so every loss and gradient of it is computed from the initial weights.
    Otherwise a GAN's second network of the step (SAHN's generator after the discriminator, LaMa's discriminator
    after the generator) sees the first after Adam's first update, lr·g/(|g| + ε): a gradient element whose
    value is round-off moves its weight by ±lr, and the comparison would measure that, not data parallelism
    (LaMa's discriminator gradients: 1.6e-3 of their largest apart; 5e-6 when held). Step 1 trains for real."""
    torch.manual_seed(0)
    method = create_method(name, **GANS[name])
    step_zero: dict[str, torch.Tensor] = {}
    steps_begun = [0]
    train_step, optimiser_step = method.train_step, method.step

    def counted_train_step(batch):
        steps_begun[0] += 1
        return train_step(batch)

    def held_at_step_zero(optimiser: str) -> None:
        if steps_begun[0] > 1:
            return optimiser_step(optimiser)
        stepped = {id(parameter) for group in method.optimizers[optimiser].param_groups for parameter in group["params"]}
        step_zero.update({parameter_name(key): parameter.grad.detach().clone()
                          for key, parameter in method.named_parameters()
                          if id(parameter) in stepped and parameter.grad is not None})

    method.train_step, method.step = counted_train_step, held_at_step_zero
    config = TrainConfig(steps=STEPS, batch_size=BATCH, seed=0, checkpoint_every=STEPS + 1)
    history = train(method, images, config, progress=False, ranks=ranks).history
    return {"losses": history, "gradients": step_zero}


def uneven_holes_batch(size: int) -> dict[str, torch.Tensor]:
    """Two images, the first with a small hole in a corner, the second with a large one in the middle."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, size, size, generator=generator)
    masks = torch.zeros(2, 1, size, size)
    masks[0, :, :size // 8, :size // 8] = 1
    masks[1, :, size // 8:-size // 8, size // 8:-size // 8] = 1
    return {"image": images, "mask": masks}


def one_uneven_step(name: str, ranks: Ranks) -> dict:
    """One train_step of ``name`` on :func:`uneven_holes_batch`, this rank's share of it: the losses (averaged over
    the ranks) and the gradients."""
    size, options = NORMALISED_LOSSES[name]
    torch.manual_seed(0)
    method = create_method(name, **options)
    batch = {key: value[ranks.share(2)] for key, value in uneven_holes_batch(size).items()}
    method.train()
    with data_parallel(method, torch.device("cpu"), ranks):
        losses = method.train_step(batch)
        averaged = dict(zip(losses, ranks.mean(torch.stack(list(losses.values()))).tolist()))
        return {"losses": averaged, "gradients": gradients(method)}


def relative_perceptual_loss(ranks: Ranks) -> dict:
    """LaMa's perceptual loss in its relative form (each feature map's MSE over the target map's mean square) on
    a dark and a bright target, on a smooth stand-in network: this rank's loss and the gradient of its share of
    the predictions, averaged over the ranks as DDP averages the parameters' gradients."""
    from baselines.lama import FeaturePerceptualLoss

    torch.manual_seed(0)
    network = nn.Conv2d(3, 4, 3)
    loss = FeaturePerceptualLoss(lambda images: [network(images)], lambda images: images, weight=1.0, relative=True)
    targets = uneven_holes_batch(SIZE)["image"] * torch.tensor([0.1, 1.0]).view(2, 1, 1, 1)
    predictions = torch.rand(targets.shape, generator=torch.Generator().manual_seed(4))
    share = ranks.share(2)
    mine = predictions[share].clone().requires_grad_(True)
    value = loss(mine, targets[share])
    (value / ranks.size).backward()
    return {"losses": {"relative": float(ranks.mean(value.detach()))},
            "gradients": {"predictions.all": torch.cat(ranks.gather(mine.grad))}}


def everything(images, ranks: Ranks) -> dict:
    return {**{name: train_two_steps(name, images, ranks) for name in GANS},
            **{f"uneven {name}": one_uneven_step(name, ranks) for name in NORMALISED_LOSSES},
            "uneven lama perceptual": relative_perceptual_loss(ranks)}


def _rank(rank: int, port: int, dataset: str, folder: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images = load_image_set("folder", "train", root=dataset, image_size=SIZE)
        results = everything(images, Ranks.of_process_group())
        if rank == 0:
            torch.save(results, Path(folder) / "0.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "data", train=8, test=2, size=SIZE)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, dataset):
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank, args=(_free_port(), str(dataset), str(folder)), nprocs=2, join=True)
    return torch.load(folder / "0.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process(dataset):
    return everything(load_image_set("folder", "train", root=dataset, image_size=SIZE), SINGLE)


# ------------------------------------------------------------------------------------ comparisons
def assert_losses_match(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= LOSS_TOLERANCE * max(1.0, abs(value)), f"{what}: loss {key} {ours[key]} vs {value}"


def assert_gradients_match(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys() and theirs, what
    scales: dict[str, float] = {}
    for key, gradient in theirs.items():
        network = key.split(".")[0]
        scales[network] = max(scales.get(network, 0.0), float(gradient.abs().max()))
    for key, gradient in theirs.items():
        scale = scales[key.split(".")[0]]
        assert scale > 0, f"{what}: {key.split('.')[0]} has no gradient"
        worst = float((ours[key] - gradient).abs().max())
        assert worst <= GRADIENT_TOLERANCE * scale, f"{what}: gradient of {key} off by {worst:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", GANS)
def test_two_workers_take_one_processs_first_step(name, two_ranks, one_process):
    """2 ranks × 1 image vs 1 process × 2 images: step 0's losses and every gradient within round-off; step 1,
    which updates the weights, ran with finite losses (a second iteration of DDP, with the optimisers)."""
    ours, theirs = two_ranks[name], one_process[name]
    assert [row["step"] for row in ours["losses"]] == [row["step"] for row in theirs["losses"]] == list(range(STEPS))
    assert_losses_match(ours["losses"][0], theirs["losses"][0], name)
    assert_gradients_match(ours["gradients"], theirs["gradients"], name)
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in ours["losses"])


@pytest.mark.parametrize("name", [*NORMALISED_LOSSES, "lama perceptual"])
def test_losses_normalised_by_their_batch_use_the_whole_batch(name, two_ranks, one_process):
    """SAHN's mask reading divides its adversarial term by the batch's count of fake patches, EdgeConnect its L1 by
    the batch's hole fraction, LaMa's relative perceptual loss by the target features' mean square: with a small
    hole (a dark target) in one half and a large hole (a bright one) in the other, each rank dividing by its own
    half's (then DDP averaging) gives other losses and gradients than one process with the whole batch."""
    ours, theirs = two_ranks[f"uneven {name}"], one_process[f"uneven {name}"]
    assert_losses_match(ours["losses"], theirs["losses"], name)
    assert_gradients_match(ours["gradients"], theirs["gradients"], name)


def test_the_uneven_batch_has_uneven_normalisers():
    """What makes the test above able to fail: the halves' fake-patch counts and hole fractions differ."""
    from sahn.discriminator import MaskGuidedDiscriminator

    size, _ = NORMALISED_LOSSES["sahn_tiny"]
    counts = MaskGuidedDiscriminator().fake_patches(uneven_holes_batch(size)["mask"]).sum(dim=(1, 2, 3)).tolist()
    assert counts[0] * 2 <= counts[1]
    holes = uneven_holes_batch(NORMALISED_LOSSES["ec_tiny"][0])["mask"].mean(dim=(1, 2, 3)).tolist()
    assert holes[0] * 10 <= holes[1]


def test_the_normaliser_of_one_process_is_its_own():
    value = torch.tensor(0.375, requires_grad=True) * 2
    normaliser = whole_batch_normaliser(value)
    assert torch.equal(normaliser, value.detach()) and not normaliser.requires_grad


# ------------------------------------------------------------------------------------ synchronised batch norm
def test_every_device_gets_the_batch_norm_that_differentiates_twice():
    """torch's SyncBatchNorm has no double backward (LaMa's R1 would raise at step 0 on GPUs): ours everywhere."""
    for device in ("cpu", "cuda"):
        network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.SyncBatchNorm(4)))
        assert synchronise_batch_norm(network, torch.device(device)) == 2
        assert isinstance(network[1], SynchronisedBatchNorm) and isinstance(network[2][0], SynchronisedBatchNorm)
        assert not network[1].force_sync


def test_forcing_synchronisation_needs_a_process_group():
    norm = SynchronisedBatchNorm(2, force_sync=True)
    with pytest.raises(RuntimeError, match="process group"):
        norm(torch.randn(2, 2, 4, 4))
    norm.eval()
    norm(torch.randn(2, 2, 4, 4))  # evaluation uses the running statistics: nothing to synchronise


@pytest.fixture
def group_of_one():
    """A process group of one rank in this process, where batch norm would not synchronise unless forced."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def all_reduces(monkeypatch):
    """Counts the differentiable all-reduces (the synchronising path's)."""
    import torch.distributed.nn.functional as functional

    calls = []
    original = functional.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(functional, "all_reduce", counted)
    return calls


def r1_discriminator_loss(discriminator: nn.Module, reals: torch.Tensor) -> torch.Tensor:
    """LaMa's discriminator loss on real images with its R1 penalty, whose gradient is taken with create_graph."""
    from baselines.lama import r1_penalty

    reals = reals.detach().requires_grad_(True)
    logits, _ = discriminator(reals)
    return torch.nn.functional.softplus(-logits).mean() + r1_penalty(logits, reals)


def test_lamas_r1_double_backward_runs_through_the_forced_synchronised_path(group_of_one, all_reduces):
    """The path the GPU smoke test runs on a 1-rank NCCL group: LaMa's discriminator with batch norm forced to
    synchronise, R1 differentiated twice; it equals plain batch norm's result (one rank holds the whole batch)."""
    from baselines.lama import OUTPUT_CHANNELS, TINY, NLayerDiscriminator

    torch.manual_seed(0)
    plain = NLayerDiscriminator(OUTPUT_CHANNELS, TINY.disc_ndf, TINY.disc_n_layers)  # lama_tiny's
    synchronised = copy.deepcopy(plain)
    assert synchronise_batch_norm(synchronised, torch.device("cpu"), force_sync=True) > 0
    reals = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for network in (plain, synchronised):
        network.train()
        r1_discriminator_loss(network, reals).backward()
    assert all_reduces  # the synchronising path ran, not plain batch norm's
    scale = max(float(parameter.grad.abs().max()) for parameter in plain.parameters())
    for (name, ours), theirs in zip(synchronised.named_parameters(), plain.parameters()):
        assert ours.grad is not None and torch.isfinite(ours.grad).all(), name
        assert float((ours.grad - theirs.grad).abs().max()) <= GRADIENT_TOLERANCE * scale, name
    for (name, ours), theirs in zip(synchronised.named_buffers(), plain.buffers()):
        assert torch.allclose(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_get_float32_statistics(group_of_one, dtype):
    """65,536 values a channel (LaMa's first normalisation at 256², batch 1): an fp16 count is infinite, bf16 sums
    keep 8 bits. Accumulated in float32 the statistics are those of the values in float64, to float32 round-off."""
    generator = torch.Generator().manual_seed(0)
    inputs = (3 + torch.randn(1, 2, 256, 256, generator=generator)).to(dtype)
    norm = SynchronisedBatchNorm(2, momentum=1.0, force_sync=True)  # momentum 1: the running values are the batch's
    output = norm(inputs)
    exact = inputs.double()
    mean, variance = exact.mean(dim=(0, 2, 3)), exact.var(dim=(0, 2, 3))
    assert torch.allclose(norm.running_mean.double(), mean, rtol=1e-6, atol=0)
    assert torch.allclose(norm.running_var.double(), variance, rtol=1e-4, atol=0)
    assert output.dtype == dtype
    expected = (exact - mean.view(1, 2, 1, 1)) / (exact.var(dim=(0, 2, 3), unbiased=False).view(1, 2, 1, 1) + 1e-5).sqrt()
    resolution = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert float((output.detach().double() - expected).abs().max()) <= resolution * 4
