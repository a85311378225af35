"""The training loop: seeded, bit-identical when repeated, and a resumed run equals an uninterrupted one; the
same with data workers; losses read at log steps; mixed precision."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bench.config import TrainConfig
from bench.data.datasets import load_image_set
from bench.data.edges import canny_edges, rgb_to_gray
from bench.errors import NotTrainable, UserError
from bench.data.masks import FreeFormConfig, TrainMaskSampler
from bench.methods import create_method
from bench.checkpoint_format import safe_torch_load
from bench.run.train import ImageCache, TrainingBatches, sample_images, train
from tests.tiny_methods import TinyTrainer, TinyTrainerConfig


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return load_image_set("faces", "train", image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


def fresh(seed=0):
    torch.manual_seed(seed)
    return TinyTrainer(TinyTrainerConfig())


def weights(method):
    return torch.cat([p.detach().flatten() for p in method.parameters()])


def test_same_seed_gives_identical_training(faces):
    config = TrainConfig(steps=6, batch_size=4, seed=3, checkpoint_every=100)
    first, second = fresh(), fresh()
    history_a = train(first, faces, config, progress=False).history
    history_b = train(second, faces, config, progress=False).history
    assert history_a == history_b and len(history_a) == 6
    assert torch.equal(weights(first), weights(second))
    other = fresh()
    history_c = train(other, faces, TrainConfig(steps=6, batch_size=4, seed=4), progress=False).history
    assert history_c != history_a  # the seed picks images and masks


def test_resumed_training_equals_uninterrupted(faces, tmp_path):
    full = fresh()
    full_result = train(full, faces, TrainConfig(steps=8, batch_size=4, checkpoint_every=3), progress=False)
    checkpoint = tmp_path / "state.pt"
    part = fresh()
    train(part, faces, TrainConfig(steps=5, batch_size=4, checkpoint_every=3), checkpoint_path=checkpoint,
          progress=False)
    # The run "died" after its step-3 checkpoint … and after step 5 (also checkpointed as the last step):
    # a new process, a new method object, the same command with the final step count.
    resumed = fresh(seed=99)  # a different init: everything must come from the checkpoint
    result = train(resumed, faces, TrainConfig(steps=8, batch_size=4, checkpoint_every=3),
                   checkpoint_path=checkpoint, progress=False)
    assert result.resumed_from == 5
    assert torch.equal(weights(resumed), weights(full))
    assert result.history == full_result.history


def test_losses_are_reported_per_step_and_callback_sees_them(faces):
    seen = []
    train(fresh(), faces, TrainConfig(steps=3, batch_size=2), on_step=lambda s, l: seen.append((s, l)),
          progress=False)
    assert [s for s, _ in seen] == [0, 1, 2]
    assert all(set(losses) >= {"hole", "total"} for _, losses in seen)


def test_classical_methods_refuse_training(faces):
    with pytest.raises(NotTrainable):
        train(create_method("diffusion_fill"), faces, TrainConfig(steps=1), progress=False)


# ------------------------------------------------------------------ the data path (in-process and in workers)
class NoisyTrainer(TinyTrainer):
    """Draws from the global torch RNG in every step (as DDNM does for timesteps and noise), and reports that
    draw: whatever else the loop does must not shift what the method draws."""

    def train_step(self, batch):
        drawn = torch.rand(())
        noise = torch.randn(batch["image"].shape)
        losses = super().train_step({**batch, "image": (batch["image"] + 0.05 * noise).clamp(0, 1)})
        return {**losses, "drawn": drawn}


def noisy(seed=0):
    torch.manual_seed(seed)
    return NoisyTrainer(TinyTrainerConfig())


def test_the_loop_draws_nothing_from_the_global_rng(faces):
    history = train(noisy(), faces, TrainConfig(steps=2, batch_size=2, seed=7), progress=False).history
    torch.manual_seed(7)  # what train() seeds; the method's first draw must be the first number after it
    assert history[0]["drawn"] == float(torch.rand(()))


def test_resumed_training_of_a_method_drawing_random_numbers_equals_uninterrupted(faces, tmp_path):
    config = TrainConfig(steps=6, batch_size=2, checkpoint_every=2)
    full = noisy()
    full_history = train(full, faces, config, progress=False).history
    part = noisy()
    checkpoint = tmp_path / "state.pt"
    train(part, faces, TrainConfig(steps=3, batch_size=2, checkpoint_every=2), checkpoint_path=checkpoint,
          progress=False)
    resumed = noisy(seed=5)
    result = train(resumed, faces, config, checkpoint_path=checkpoint, progress=False)
    assert result.resumed_from == 3
    assert result.history == full_history
    assert torch.equal(weights(resumed), weights(full))


def test_batches_are_the_direct_formula_of_seed_and_step(faces):
    """Step t's batch is what the loop drew before it had a data path: sample_images, then the t-th batch of a
    fresh mask sampler; whichever step is asked first."""
    config = TrainConfig(steps=5, batch_size=3, seed=2)
    sequential = TrainMaskSampler(faces.image_size, config.seed, FreeFormConfig(preset=config.mask_preset),
                                  max_ratio=config.max_mask_ratio)
    expected = [(sample_images(ImageCache(faces), config, step), sequential.sample(config.batch_size))
                for step in range(config.steps)]
    batches = TrainingBatches(faces, config, TrainMaskSampler(faces.image_size, config.seed,
                                                              FreeFormConfig(preset=config.mask_preset),
                                                              max_ratio=config.max_mask_ratio), None)
    for step in (3, 0, 4, 1, 2):
        assert torch.equal(batches[step]["image"], expected[step][0])
        assert torch.equal(batches[step]["mask"], expected[step][1])


def test_data_workers_give_the_same_losses_and_weights(faces):
    config = TrainConfig(steps=5, batch_size=3, seed=1)
    in_process, in_workers = noisy(), noisy()
    history = train(in_process, faces, config, progress=False).history
    assert train(in_workers, faces, config, progress=False, data_workers=2).history == history
    assert torch.equal(weights(in_workers), weights(in_process))


def gray_edges(images, masks):
    """A host-side input as EdgeConnect's: Canny edges of the gray image, by scikit-image."""
    return {"edges": canny_edges(rgb_to_gray(images))}


class EdgeInputTrainer(TinyTrainer):
    """Uses Canny edges made on the host when the batch has them, else computes them itself."""

    def __init__(self, config):
        super().__init__(config)
        self.had_host_inputs = []

    def host_preprocessing(self, purpose):
        return gray_edges

    def train_step(self, batch):
        self.had_host_inputs.append("edges" in batch)
        edges = batch["edges"] if "edges" in batch else gray_edges(batch["image"], batch["mask"])["edges"]
        return super().train_step({**batch, "image": batch["image"] * (1 - 0.5 * edges)})


def test_host_preprocessing_runs_where_batches_are_made_and_changes_no_loss(faces):
    config = TrainConfig(steps=3, batch_size=2, seed=4)
    torch.manual_seed(0)
    method = EdgeInputTrainer(TinyTrainerConfig())
    reference = copy.deepcopy(method)
    history = train(method, faces, config, progress=False, data_workers=2).history
    assert method.had_host_inputs == [True] * config.steps
    plain = TrainingBatches(faces, config, TrainMaskSampler(faces.image_size, config.seed,
                                                            FreeFormConfig(preset=config.mask_preset),
                                                            max_ratio=config.max_mask_ratio), None)
    expected = [{"step": step, **{k: float(v) for k, v in reference.train_step(plain[step]).items()}}
                for step in range(config.steps)]
    assert reference.had_host_inputs == [False] * config.steps
    assert history == expected
    assert torch.equal(weights(method), weights(reference))


def test_bad_data_worker_counts_are_user_errors(faces):
    with pytest.raises(UserError, match="data workers"):
        train(fresh(), faces, TrainConfig(steps=1, batch_size=2), progress=False, data_workers=-1)


# ------------------------------------------------------------------ losses read at log steps only
class RecordingTrainer(TinyTrainer):
    """Keeps every step's returned losses, to compare with what the loop logged."""

    def __init__(self, config, poison_at_step=None):
        super().__init__(config)
        self.returned, self.poison_at_step = [], poison_at_step

    def train_step(self, batch):
        losses = super().train_step(batch)
        if len(self.returned) == self.poison_at_step:
            losses["total"] = losses["total"] * float("nan")
        self.returned.append(losses)
        return losses


def test_train_steps_return_detached_tensors_and_the_log_holds_their_float_values(faces):
    torch.manual_seed(0)
    method = RecordingTrainer(TinyTrainerConfig())
    history = train(method, faces, TrainConfig(steps=6, batch_size=2, log_every=4), progress=False).history
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad
               for losses in method.returned for v in losses.values())
    assert [entry["step"] for entry in history] == [0, 4, 5]  # every log_every-th step and the last
    for entry in history:  # what float() of each value gave before the loop read them in one copy
        assert entry == {"step": entry["step"], **{k: float(v) for k, v in method.returned[entry["step"]].items()}}


def test_a_non_finite_loss_stops_training_by_the_next_log_step_before_any_checkpoint(faces, tmp_path):
    torch.manual_seed(0)
    method = RecordingTrainer(TinyTrainerConfig(), poison_at_step=3)
    checkpoint = tmp_path / "state.pt"
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        train(method, faces, TrainConfig(steps=12, batch_size=2, log_every=5, checkpoint_every=2),
              checkpoint_path=checkpoint, progress=False)
    assert len(method.returned) == 4  # stopped at the checkpoint after step 3, not at the log step 5
    assert safe_torch_load(checkpoint)["step"] == 2  # the last checkpoint is from before the bad step


# ------------------------------------------------------------------ mixed precision
def test_bf16_trains_a_tiny_method_end_to_end_on_cpu_and_records_its_precision(faces, tmp_path):
    method = fresh()
    dtypes = set()
    method.net[0].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    before = weights(method).clone()
    checkpoint = tmp_path / "state.pt"
    result = train(method, faces, TrainConfig(steps=4, batch_size=2), checkpoint_path=checkpoint, progress=False,
                   precision="bf16")
    assert dtypes == {torch.bfloat16}  # the forward passes ran under autocast
    assert result.precision == "bf16" and safe_torch_load(checkpoint)["precision"] == "bf16"
    assert all(math.isfinite(v) for entry in result.history for k, v in entry.items() if k != "step")
    assert not torch.equal(weights(method), before)
    assert all(p.dtype == torch.float32 for p in method.parameters())  # parameters stay float32
    with pytest.raises(UserError, match="precision bf16"):  # a checkpoint resumes only at its own precision
        train(fresh(), faces, TrainConfig(steps=6, batch_size=2), checkpoint_path=checkpoint, progress=False)


def test_fp16_scales_the_loss_and_resumes_bit_identically_with_the_scaler_state(faces, tmp_path):
    config = TrainConfig(steps=6, batch_size=2, checkpoint_every=2)
    full = fresh()
    full_result = train(full, faces, config, progress=False, precision="fp16")
    assert full.grad_scaler is not None and full.grad_scaler.get_scale() > 1
    checkpoint = tmp_path / "state.pt"
    train(fresh(), faces, TrainConfig(steps=3, batch_size=2, checkpoint_every=2), checkpoint_path=checkpoint,
          progress=False, precision="fp16")
    resumed = fresh(seed=9)
    result = train(resumed, faces, config, checkpoint_path=checkpoint, progress=False, precision="fp16")
    assert result.history == full_result.history
    assert torch.equal(weights(resumed), weights(full))
    assert resumed.grad_scaler.state_dict() == full.grad_scaler.state_dict()


def test_fp32_is_the_default_and_the_helpers_change_nothing_there(faces):
    """At fp32 backward/step are plain ``loss.backward()`` / ``optimizer.step()``: a step through them equals
    one written without them."""
    method, plain = fresh(), fresh()
    train(method, faces, TrainConfig(steps=1, batch_size=2, seed=3), progress=False)
    assert method.precision == "fp32" and method.grad_scaler is None
    batch = TrainingBatches(faces, TrainConfig(steps=1, batch_size=2, seed=3),
                            TrainMaskSampler(faces.image_size, 3), None)[0]
    prediction = plain.inpaint(batch["image"], batch["mask"])
    masks, images = batch["mask"], batch["image"]
    total = (F.l1_loss(prediction * masks, images * masks) + 0.5 * F.l1_loss(prediction * (1 - masks),
                                                                               images * (1 - masks)))
    plain.optimizers["net"].zero_grad()
    total.backward()
    plain.optimizers["net"].step()
    assert torch.equal(weights(method), weights(plain))


def test_unknown_precisions_are_user_errors(faces):
    with pytest.raises(UserError, match="precision"):
        train(fresh(), faces, TrainConfig(steps=1, batch_size=2), progress=False, precision="fp8")
