"""The training loop: seeded, bit-identical when repeated, and a resumed run equals an uninterrupted one."""
import pytest
import torch

from bench.config import TrainConfig
from bench.datasets import load_image_set
from bench.errors import NotTrainable
from bench.methods import create_method
from bench.train import train
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
