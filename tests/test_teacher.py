"""bench.nn.teacher: the frozen semantic teacher (EfficientNet-Lite0 substitute, ASL TResNet-L loader)."""
import re

import pytest
import timm
from timm.models.tresnet import TResNet
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError, WeightsUnavailable
from bench.nn.layers import FrozenNetworks
from bench.metrics.pretrained import efficientnet_lite0_features, lite0_normalize
from bench.nn.teacher import (SemanticTeacher, create_teacher, lite0_teacher, substitution_note, tresnet_l_stem,
                           tresnet_l_teacher)


@pytest.fixture(scope="module")
def lite0():
    return lite0_teacher()


def test_lite0_teacher_gives_three_scales_at_strides_2_4_8(lite0):
    assert lite0.channels == (16, 24, 40) and lite0.strides == (2, 4, 8)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = lite0(images)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 32), (2, 24, 16, 16), (2, 40, 8, 8)]


def test_lite0_teacher_equals_the_pretrained_feature_model(lite0):
    """The truncated stages and the (x·255 − 127)/128 input scaling reproduce timm's full feature model."""
    reference, _ = efficientnet_lite0_features(out_indices=(0, 1, 2))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(lite0_normalize(images))
    for got, want in zip(lite0(images), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)  # (x−μ)/σ vs (255x−127)/128 rounding


def test_teacher_is_frozen_gradient_free_and_stays_in_eval(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert all(m.grad_fn is None for m in lite0(images))


def test_teacher_rejects_sizes_it_cannot_halve_three_times(lite0):
    with pytest.raises(ValueError, match="multiple of 8"):
        lite0(torch.rand(1, 3, 36, 36))


def test_lite0_is_recorded_as_a_substitute(lite0):
    note = substitution_note(lite0)
    assert "efficientnet_lite0" in note and "TResNet-L" in note and "sha256:" in note


def test_frozen_networks_are_unsaved_unoptimised_but_moved(lite0):
    class Owner(FrozenNetworks, nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(16, 1, 1)
            self.hold_frozen("teacher", lite0_teacher())

    owner = Owner()
    assert all(k.startswith("head.") for k in owner.state_dict())
    assert sum(p.numel() for p in owner.parameters()) == 17
    owner.double()
    assert owner.frozen("teacher").mean.dtype == torch.float64
    assert next(owner.frozen("teacher").parameters()).dtype == torch.float64
    owner.train()
    assert not owner.frozen("teacher").training


def test_unknown_teacher_is_a_user_error():
    with pytest.raises(UserError, match="resnet50"):
        create_teacher("resnet50")


# --------------------------------------------------------------------- ASL TResNet-L loader
def test_missing_tresnet_weights_raise_instead_of_falling_back(tmp_path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        tresnet_l_teacher(tmp_path / "Open_ImagesV6_TRresNet_L_448.pth")


def _randomise_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine weights, so a wrong key or a wrong InPlaceABN conversion shows."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) + 0.5)


def _asl_key(timm_key: str, blurred: set[str]) -> str:
    """timm ConvNormAct names → ASL's Sequential(conv, InPlaceABN) indices (written independently of timm's
    forward mapping): ``convN.conv`` → ``convN.0``, ``convN.bn`` → ``convN.1``; inside an anti-aliased conv
    ASL nests one level deeper (``convN.0.0`` / ``convN.0.1``); ``downsample.1.conv/bn`` → ``downsample.1.0/1``."""
    match = re.match(r"(.*\b(conv\d+|downsample\.\d+))\.(conv|bn)\.(.*)", timm_key)
    if match is None:
        return "body." + timm_key
    prefix, _, part, rest = match.groups()
    index = "0" if part == "conv" else "1"
    if prefix in blurred:
        index = "0." + index
    return f"body.{prefix}.{index}.{rest}"


def _write_asl_checkpoint(stem: nn.Module, path, drop: str | None = None) -> None:
    blurred = {name for name, module in stem.named_modules() if getattr(module, "aa", None) is not None}
    state = {}
    for key, value in stem.state_dict().items():
        if key.endswith("num_batches_tracked") or key == drop:
            continue
        if key.endswith("bn.weight"):
            value = value - 1e-5  # InPlaceABN stores w with the layer using |w| + eps
        state[_asl_key(key, blurred)] = value.clone()
    state["head.fc.weight"] = torch.zeros(3, 8)  # the classifier is ignored by the truncated teacher
    torch.save({"model": state, "idx_to_class": {0: "cat", 1: "dog", 2: "tree"}, "image_size": 448}, path)


@pytest.fixture(scope="module")
def asl_file(tmp_path_factory):
    torch.manual_seed(0)
    reference = tresnet_l_stem()
    _randomise_batch_norms(reference, torch.Generator().manual_seed(0))
    reference.eval()
    path = tmp_path_factory.mktemp("asl") / "Open_ImagesV6_TRresNet_L_448.pth"
    _write_asl_checkpoint(reference, path)
    return path, reference


def test_asl_checkpoint_loads_into_the_three_layouts(asl_file):
    path, reference = asl_file
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conv1, layer1, layer2 = reference(images)
    expected = {"sahn": [F.interpolate(conv1, scale_factor=2, mode="nearest"), layer1, layer2],
                "spn": [conv1, layer1, layer2], "spl": [layer2]}
    shapes = {"sahn": ((76, 76, 152), (2, 4, 8)), "spn": ((76, 76, 152), (4, 4, 8)), "spl": ((152,), (8,))}
    for layout in ("sahn", "spn", "spl"):
        teacher = tresnet_l_teacher(path, layout=layout)
        assert isinstance(teacher, SemanticTeacher) and teacher.is_paper_teacher
        assert (teacher.channels, teacher.strides) == shapes[layout]
        assert substitution_note(teacher) is None
        got = teacher(images)
        assert len(got) == len(expected[layout])
        for a, b in zip(got, expected[layout]):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert [m.shape[-1] for m in tresnet_l_teacher(path, "sahn")(images)] == [32, 16, 8]  # H/2, H/4, H/8 of 64


def test_asl_checkpoint_with_a_missing_tensor_is_rejected(asl_file, tmp_path):
    _, reference = asl_file
    broken = tmp_path / "broken.pth"
    _write_asl_checkpoint(reference, broken, drop="layer2.0.se.fc1.weight")
    with pytest.raises(WeightsUnavailable, match=r"layer2\.0\.se\.fc1\.weight"):
        tresnet_l_teacher(broken)


def test_tresnet_m_checkpoint_is_rejected_by_shape(tmp_path):
    torch.manual_seed(0)
    medium_stem = TResNet(layers=[3, 4, 1, 1], width_factor=1.0, num_classes=0)  # tresnet_m's first stages
    path = tmp_path / "tresnet_m.pth"
    torch.save({"model": medium_stem.state_dict()}, path)  # timm key layout is accepted as well
    with pytest.raises(WeightsUnavailable, match="shapes do not fit TResNet-L"):
        tresnet_l_teacher(path)


def test_stem_is_timm_tresnet_l_up_to_layer2():
    full = timm.create_model("tresnet_l", pretrained=False, num_classes=0)
    expected = {k: tuple(v.shape) for k, v in full.state_dict().items()
                if k.split(".")[1] in ("conv1", "layer1", "layer2")}
    got = {"body." + k: tuple(v.shape) for k, v in tresnet_l_stem().state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in tresnet_l_stem().parameters()) == 2_578_192  # SPL's teacher: docs/official-sources.md
