"""Metric networks: strict loading of registry files, equality with the reference packages, real Lite0, Scorer.

Inception and AlexNet weights cannot be downloaded here, so seeded random state_dicts saved to
tmp_path stand in for the files: they prove the loading and the forward pass equal pytorch-fid's
and lpips' own, never that the numbers are FID or LPIPS values. Such test files are registered
under a file name without torch hub's hash suffix (the real names carry the real file's hash).
"""
import dataclasses
import shutil
import warnings

import lpips
import numpy as np
import pytest
import pytorch_fid.inception
import torch
import torchvision
from skimage import data

from bench.errors import CheckpointError, WeightsUnavailable
from bench.metrics.features import (fid_inception_network, inception_fid_extractor, lite0_distance, lite0_extractor,
                            lpips_metric)
from bench.metrics.functional import mae, psnr, ssim
from bench.metrics.scoring import Scorer
from bench.metrics.pretrained_registry import WEIGHTS


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path and downloads off: only explicit files and packages resolve."""
    previous = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SAHN_BENCH_OFFLINE", "1")
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    yield tmp_path / "torch" / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def accept_test_files_for(monkeypatch, key):
    monkeypatch.setitem(WEIGHTS, key, dataclasses.replace(WEIGHTS[key], filename=f"{key}-test-file.pth"))


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = fid_inception_network()
        for module in network.modules():  # non-trivial batch-norm statistics, so loading them matters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def random_alexnet_file(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path_factory.mktemp("alexnet") / "random_alexnet.pth"
    torch.save(state, path)
    return path


def random_images(count, size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)


def photo_crop(size=64):
    return torch.from_numpy(data.astronaut()[40:40 + size, 180:180 + size].copy()).permute(2, 0, 1)[None]


def noisy(images, sigma, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------- Inception (FID)
def pytorch_fid_inception(state, monkeypatch, **options):
    """pytorch-fid's own InceptionV3 (pool3 output), its download replaced by ``state``."""
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    return pytorch_fid.inception.InceptionV3([3], **options).eval()


def test_inception_extractor_loads_strictly_and_equals_pytorch_fid(random_inception_file, monkeypatch):
    accept_test_files_for(monkeypatch, "inception_fid")
    extractor = inception_fid_extractor(random_inception_file)
    assert extractor.name == "inception_v3_fid"
    assert extractor.provenance.startswith("random_fid_inception.pth sha256:")
    state = torch.load(random_inception_file, weights_only=True)
    # The network: compared without the 299² resize (a small input keeps the test fast).
    reference = pytorch_fid_inception(state, monkeypatch, resize_input=False)
    unit = random_images(1, 96, seed=2).float() / 255.0
    with torch.no_grad():
        ours = extractor.layers(2.0 * unit - 1.0)
        theirs = reference(unit)[0].flatten(1)
    assert ours.shape == (1, 2048) and ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_inception_input_conventions_equal_pytorch_fid(random_inception_file, monkeypatch):
    """With both networks replaced by the identity, the outputs are the preprocessed inputs."""
    accept_test_files_for(monkeypatch, "inception_fid")
    extractor = inception_fid_extractor(random_inception_file)
    reference = pytorch_fid_inception(torch.load(random_inception_file, weights_only=True), monkeypatch)
    extractor.layers = torch.nn.Identity()
    reference.blocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)])
    images = random_images(2, 40, seed=7)
    with torch.no_grad():
        ours = extractor(images)
        theirs = reference(images.float() / 255.0)[0]
    assert ours.shape == (2, 3, 299, 299)
    torch.testing.assert_close(ours, theirs)


def test_inception_file_with_a_missing_tensor_is_refused(random_inception_file, tmp_path, monkeypatch):
    accept_test_files_for(monkeypatch, "inception_fid")
    state = torch.load(random_inception_file, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="missing keys: Mixed_7c.branch_pool.conv.weight"):
        inception_fid_extractor(broken)


def test_a_cached_inception_file_with_the_wrong_hash_is_refused(random_inception_file, isolated_hub):
    isolated_hub.mkdir(parents=True)
    shutil.copy(random_inception_file, isolated_hub / WEIGHTS["inception_fid"].filename)
    with pytest.raises(WeightsUnavailable, match="does not match the expected 6726825d"):
        inception_fid_extractor()


# ---------------------------------------------------------------------------------- Lite0
def test_lite0_features_are_pretrained_they_classify_chelsea_as_a_cat():
    extractor = lite0_extractor()
    assert extractor.name == "efficientnet_lite0"
    assert extractor.provenance.startswith("efficientnet-lite0-57934424.pth sha256:579344248a93")
    chelsea = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        features = extractor(chelsea)
        logits = extractor.network.get_classifier()(features)
    assert features.shape == (1, 1280)
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's five domestic-cat classes


def test_lite0_dist_is_zero_for_identical_images_symmetric_and_grows_with_distortion():
    distance = lite0_distance()
    assert distance.name == "lite0_dist"
    photo = photo_crop()
    with torch.no_grad():
        same = distance(photo, photo)
        mild, mild_swapped = distance(noisy(photo, 8), photo), distance(photo, noisy(photo, 8))
        strong = distance(noisy(photo, 40), photo)
    assert same.dtype == torch.float64 and same.item() == pytest.approx(0.0, abs=1e-9)
    assert mild.item() == pytest.approx(mild_swapped.item(), rel=1e-5)
    assert 0 < mild.item() < strong.item()


# ---------------------------------------------------------------------------------- LPIPS
def lpips_package_with_trunk(trunk_file):
    """lpips' own model (shipped linear layers) with its trunk's conv layers copied from a torchvision AlexNet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet.load_state_dict(torch.load(trunk_file, weights_only=True))
    for _, piece in reference.net.named_children():
        for index, layer in piece.named_children():
            layer.load_state_dict(alexnet.features[int(index)].state_dict())
    return reference.eval()


def test_lpips_equals_the_lpips_package_with_the_same_trunk(random_alexnet_file, monkeypatch):
    accept_test_files_for(monkeypatch, "alexnet")
    ours = lpips_metric("alex", trunk_path=random_alexnet_file)
    assert ours.provenance.startswith("random_alexnet.pth sha256:") and "alex.pth sha256:" in ours.provenance
    reference = lpips_package_with_trunk(random_alexnet_file)
    pred, truth = random_images(3, 64, seed=3), random_images(3, 64, seed=4)
    with torch.no_grad():
        expected = reference(pred.float() / 127.5 - 1.0, truth.float() / 127.5 - 1.0).flatten().double()
        actual = ours(pred, truth)
        identical = ours(pred, pred)
    assert actual.dtype == torch.float64 and (actual > 0).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    assert identical.abs().max() < 1e-9


def test_lpips_is_unavailable_offline_and_refuses_a_wrong_trunk(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailable, match="alexnet"):
        lpips_metric("alex")
    accept_test_files_for(monkeypatch, "alexnet")
    wrong = tmp_path / "not_alexnet.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not match AlexNet"):
        lpips_metric("alex", trunk_path=wrong)


# ---------------------------------------------------------------------------------- Scorer
def test_scorer_offline_reports_inception_and_lpips_unavailable_and_scores_the_rest(random_alexnet_file,
                                                                                   isolated_hub):
    isolated_hub.mkdir(parents=True)
    shutil.copy(random_alexnet_file, isolated_hub / WEIGHTS["alexnet"].filename)  # wrong hash for the real name
    scorer = Scorer()
    assert set(scorer.unavailable()) == {"lpips", "inception_v3_fid"}
    assert "does not match" in scorer.unavailable()["lpips"]
    provenance = scorer.provenance()
    assert provenance["lpips"].startswith("unavailable: ")
    assert provenance["inception_v3_fid"].startswith("unavailable: ")
    assert provenance["lite0_dist"].startswith("efficientnet-lite0-57934424.pth sha256:")
    assert provenance["efficientnet_lite0"] == provenance["lite0_dist"]
    truth = photo_crop(48).repeat(2, 1, 1, 1)
    pred = torch.cat([truth[:1], noisy(truth[1:], 20)])
    scores = scorer.per_image(pred, truth)
    assert list(scores) == ["psnr", "ssim", "mae", "lite0_dist"]
    torch.testing.assert_close(scores["psnr"], psnr(pred, truth))
    torch.testing.assert_close(scores["ssim"], ssim(pred, truth))
    torch.testing.assert_close(scores["mae"], mae(pred, truth))
    assert scores["lite0_dist"][0] == 0 and scores["lite0_dist"][1] > 0
    features = scorer.features(truth)
    assert list(features) == ["efficientnet_lite0"] and features["efficientnet_lite0"].shape == (2, 1280)


def test_scorer_uses_explicit_files(random_inception_file, random_alexnet_file, monkeypatch):
    accept_test_files_for(monkeypatch, "alexnet")
    accept_test_files_for(monkeypatch, "inception_fid")
    scorer = Scorer(inception_path=random_inception_file, lpips_trunk_path=random_alexnet_file)
    assert scorer.unavailable() == {}
    pred, truth = random_images(1, 32, seed=5), random_images(1, 32, seed=6)
    assert list(scorer.per_image(pred, truth)) == ["psnr", "ssim", "mae", "lpips", "lite0_dist"]
    features = scorer.features(pred)
    assert {name: tuple(value.shape) for name, value in features.items()} == {
        "inception_v3_fid": (1, 2048), "efficientnet_lite0": (1, 1280)}
    assert scorer.provenance()["inception_v3_fid"].startswith("random_fid_inception.pth sha256:")
    assert np.isfinite(features["inception_v3_fid"].numpy()).all()


# ---------------------------------------------------------------------------------- one embedding per ground truth
def test_a_shared_ground_truth_embedded_once_scores_like_each_pair_on_its_own(random_alexnet_file, monkeypatch):
    """Scorer.reference embeds each ground truth once for all its pairs; LPIPS split into embed + compare is the
    lpips package's forward operation for operation; the scores are those of every pair scored alone."""
    from bench.metrics.features import uint8_to_signed
    from bench.metrics.scoring import select

    accept_test_files_for(monkeypatch, "alexnet")
    scorer = Scorer(device=torch.device("cpu"), lpips_trunk_path=random_alexnet_file)
    lpips_net = scorer._distances["lpips"]
    truths = random_images(2, 48, seed=1)
    index = torch.tensor([0, 0, 0, 1, 1])  # three pairs of the first image, two of the second
    pred = noisy(truths[index], 20, seed=2)
    with torch.no_grad():
        for i in range(len(pred)):
            one, gt = pred[i:i + 1], truths[index[i:i + 1]]
            assert torch.equal(lpips_net(one, gt), lpips_net.model(uint8_to_signed(one), uint8_to_signed(gt))
                               .flatten().double())
    reference = {name: select(embedding, index) for name, embedding in scorer.reference(truths).items()}
    shared = scorer.per_image(pred, truths[index], reference)
    alone = [scorer.per_image(pred[i:i + 1], truths[index[i:i + 1]]) for i in range(len(pred))]
    assert list(shared) == ["psnr", "ssim", "mae", "lpips", "lite0_dist"]
    for name, values in shared.items():
        assert torch.equal(values, torch.cat([scores[name] for scores in alone])), name
