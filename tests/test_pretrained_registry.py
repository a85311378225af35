"""The pretrained-network registry: resolution order, hash checks, the real download code (on file:// URLs), provenance."""
import hashlib
import shutil

import pytest
import torch

from bench.metrics import pretrained_registry as weights
from bench.errors import WeightsUnavailable
from bench.files import sha256_file
from bench.metrics.pretrained_registry import WEIGHTS, WeightsSpec, resolve_weights, weights_provenance


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path, downloads off, and no memory of earlier failed URLs."""
    previous = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SAHN_BENCH_OFFLINE", "1")
    monkeypatch.setattr(weights, "_FAILED", {})
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    yield tmp_path / "torch" / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def write_bytes(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def register(monkeypatch, **fields) -> WeightsSpec:
    spec = WeightsSpec(**{"key": "toy", "filename": "toy.pth", "url": "file:///nonexistent/toy.pth",
                          "license": "test", "description": "test weights", **fields})
    monkeypatch.setitem(WEIGHTS, spec.key, spec)
    return spec


def test_explicit_path_wins_over_the_cache(isolated_hub, tmp_path, monkeypatch):
    register(monkeypatch)
    write_bytes(isolated_hub / "toy.pth", b"cached")
    explicit = write_bytes(tmp_path / "mine.pth", b"explicit")
    resolved = resolve_weights("toy", explicit)
    assert (resolved.source, resolved.path) == ("explicit", explicit)
    assert resolved.sha256 == hashlib.sha256(b"explicit").hexdigest()
    assert resolve_weights("toy").source == "cache"
    with pytest.raises(WeightsUnavailable, match="not found"):
        resolve_weights("toy", tmp_path / "missing.pth")


def test_package_file_is_found_and_the_cache_wins_over_it(isolated_hub, tmp_path, monkeypatch):
    package = tmp_path / "site" / "toy_weights_pkg"
    write_bytes(package / "__init__.py", b"")
    shipped = write_bytes(package / "models" / "toy.pth", b"shipped")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    register(monkeypatch, package="toy_weights_pkg")
    resolved = resolve_weights("toy")
    assert (resolved.source, resolved.path) == ("package", shipped)
    write_bytes(isolated_hub / "toy.pth", b"cached")
    assert resolve_weights("toy").source == "cache"


def test_the_real_lite0_file_resolves_from_its_package_then_from_the_cache(isolated_hub):
    resolved = resolve_weights("efficientnet_lite0")
    assert resolved.source == "package"
    assert resolved.sha256 == WEIGHTS["efficientnet_lite0"].sha256
    isolated_hub.mkdir(parents=True)
    shutil.copy(resolved.path, isolated_hub / WEIGHTS["efficientnet_lite0"].filename)
    assert resolve_weights("efficientnet_lite0").source == "cache"


def test_offline_without_a_file_is_unavailable_and_provenance_says_so(isolated_hub):
    with pytest.raises(WeightsUnavailable, match="alexnet-owt-7be5be79.pth"):
        resolve_weights("alexnet")
    assert not (isolated_hub / "alexnet-owt-7be5be79.pth").exists()
    provenance = weights_provenance("inception_fid")
    assert provenance.startswith("unavailable: ") and "pt_inception-2015-12-05" in provenance
    assert weights_provenance("efficientnet_lite0").startswith("efficientnet-lite0-57934424.pth sha256:5793442")


def test_hash_prefix_in_the_file_name_rejects_a_tampered_file(isolated_hub, tmp_path, monkeypatch):
    genuine = b"genuine weights"
    prefix = hashlib.sha256(genuine).hexdigest()[:8]
    register(monkeypatch, filename=f"toy-{prefix}.pth")
    good = write_bytes(tmp_path / "good.pth", genuine)
    assert resolve_weights("toy", good).sha256.startswith(prefix)
    write_bytes(isolated_hub / f"toy-{prefix}.pth", b"tampered weights")
    with pytest.raises(WeightsUnavailable, match="does not match"):
        resolve_weights("toy")


def test_full_sha256_rejects_a_tampered_file(tmp_path, monkeypatch):
    register(monkeypatch, sha256=hashlib.sha256(b"exact").hexdigest())
    assert resolve_weights("toy", write_bytes(tmp_path / "exact.pth", b"exact")).source == "explicit"
    with pytest.raises(WeightsUnavailable, match="does not match"):
        resolve_weights("toy", write_bytes(tmp_path / "other.pth", b"exacT"))


def test_download_runs_the_real_code_on_a_file_url(isolated_hub, tmp_path, monkeypatch):
    source = write_bytes(tmp_path / "server" / "weights.pth", b"downloaded bytes")
    prefix = sha256_file(source)[:10]
    register(monkeypatch, filename=f"toy-{prefix}.pth", url=source.as_uri())
    with pytest.raises(WeightsUnavailable, match="not in"):  # offline: not even tried
        resolve_weights("toy")
    monkeypatch.setenv("SAHN_BENCH_OFFLINE", "0")
    resolved = resolve_weights("toy")
    assert resolved.source == "download"
    assert resolved.path == isolated_hub / f"toy-{prefix}.pth"
    assert resolved.path.read_bytes() == b"downloaded bytes"
    assert resolve_weights("toy").source == "cache"


def test_a_corrupt_download_is_removed_and_a_failed_url_is_not_retried(isolated_hub, tmp_path, monkeypatch):
    source = write_bytes(tmp_path / "server" / "weights.pth", b"corrupt bytes")
    register(monkeypatch, filename="toy-0123abcd.pth", url=source.as_uri())
    with pytest.raises(WeightsUnavailable, match="does not match"):
        resolve_weights("toy", download=True)
    assert not (isolated_hub / "toy-0123abcd.pth").exists()
    register(monkeypatch, key="gone", filename="gone.pth", url=(tmp_path / "missing.pth").as_uri())
    attempts = []
    real_download = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: attempts.append(a) or real_download(*a, **k))
    with pytest.raises(WeightsUnavailable, match="cannot download") as first:
        resolve_weights("gone", download=True)
    with pytest.raises(WeightsUnavailable) as second:
        resolve_weights("gone", download=True)
    assert len(attempts) == 1  # not retried ...
    assert str(second.value) == str(first.value)  # ... and every later result records the original reason
