import dataclasses

import pytest
import torch
from torch import nn

from bench import create_method
from bench.errors import CheckpointError, NotTrainable, UserError
from bench.methods import InpaintingMethod, apply_overrides, available_methods, register_method, variant
from bench.checkpoint_format import load_state_dict_strict, safe_torch_load


@dataclasses.dataclass
class TinyConfig:
    width: int = 4


class TinyMethod(InpaintingMethod):
    paper_name = None

    def __init__(self, config):
        super().__init__(config)
        self.generator = nn.Conv2d(4, 3, 3, padding=1)
        self.discriminator = nn.Conv2d(3, 1, 3)

    def inpaint(self, images, masks):
        return torch.sigmoid(self.generator(torch.cat([images * (1 - masks), masks], 1)))


@variant(scale="tiny")
def tiny_method(**overrides):
    return TinyMethod(apply_overrides(TinyConfig(), overrides))


register_method("test_tiny", tiny_method)


def test_registry_finds_entry_points_and_local_methods():
    names = available_methods()
    assert {"biharmonic", "diffusion_fill", "test_tiny"} <= set(names)
    assert "test_tiny" in available_methods("tiny")
    assert "test_tiny" not in available_methods("paper")
    assert "biharmonic" in available_methods("paper")  # scale "any" counts for both presets


def test_every_module_declaring_variants_is_one_entry_point_line():
    import importlib.metadata
    from pathlib import Path

    from bench.methods import ENTRY_POINT_GROUP

    root = Path(__file__).resolve().parents[1]
    declaring = {".".join(path.relative_to(root).with_suffix("").parts)
                 for folder in ("sahn", "baselines") for path in (root / folder).rglob("*.py")
                 if "\n@variant(" in path.read_text()}
    entries = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
               if ep.dist is not None and ep.dist.name == "sahn-bench"]
    assert all(ep.attr is None for ep in entries)  # modules, not one line per variant
    assert sorted(ep.module for ep in entries) == sorted(declaring)
    assert len(available_methods()) >= 24 and {"ddnm_imagenet", "sahn_paper_d_image", "spn_tiny"} <= set(
        available_methods())


def test_unknown_method_and_option_are_clear_errors():
    with pytest.raises(UserError, match="unknown method 'nope'.*biharmonic"):
        create_method("nope")
    with pytest.raises(UserError, match=r"unknown option\(s\) \['depth'\].*width"):
        create_method("test_tiny", depth=3)
    assert create_method("test_tiny", width=7).config.width == 7


def test_num_parameters_per_network():
    method = create_method("test_tiny")
    assert method.num_parameters() == {"generator": 4 * 3 * 9 + 3, "discriminator": 3 * 9 + 1}


def test_save_load_round_trip_is_strict(tmp_path):
    torch.manual_seed(0)
    source = create_method("test_tiny")
    source.save(tmp_path / "m.pt")
    torch.manual_seed(1)
    target = create_method("test_tiny")
    x, m = torch.rand(2, 3, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert not torch.equal(source.inpaint(x, m), target.inpaint(x, m))
    target.load(tmp_path / "m.pt")
    assert torch.equal(source.inpaint(x, m), target.inpaint(x, m))
    payload = safe_torch_load(tmp_path / "m.pt")
    assert payload["format"] == "sahn-bench/1" and payload["method"] == "test_tiny"


def test_strict_load_names_missing_unexpected_and_mismatched_keys():
    method = create_method("test_tiny")
    state = method.state_dict()
    state.pop("generator.bias")
    state["extra.weight"] = torch.zeros(1)
    state["discriminator.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(method, state, what="ckpt")
    message = str(info.value)
    assert "missing keys: generator.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "discriminator.weight (2, 2) vs (1, 3, 3, 3)" in message


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_refuses_pickled_objects(tmp_path, capsys):
    torch.save({"format": "sahn-bench/1", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        safe_torch_load(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        create_method("test_tiny").load(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


def test_missing_checkpoint_and_foreign_format(tmp_path):
    method = create_method("test_tiny")
    with pytest.raises(UserError, match="checkpoint not found"):
        method.load(tmp_path / "absent.pt")
    torch.save({"some": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither a sahn-bench checkpoint nor an official release of test_tiny"):
        method.load(tmp_path / "foreign.pt")


def test_default_train_step_says_not_trainable():
    with pytest.raises(NotTrainable):
        create_method("biharmonic").train_step({})


def test_training_state_round_trip_includes_optimizer():
    method = create_method("test_tiny")
    method.optimizers["g"] = torch.optim.Adam(method.generator.parameters(), lr=1e-3)
    loss = method.inpaint(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8)).mean()
    loss.backward()
    method.optimizers["g"].step()
    state = method.training_state()
    other = create_method("test_tiny")
    other.optimizers["g"] = torch.optim.Adam(other.generator.parameters(), lr=1e-3)
    other.load_training_state(state)
    assert torch.equal(other.generator.weight, method.generator.weight)
    assert other.optimizers["g"].state_dict()["state"][0]["step"] == 1
