"""Downloading a standard restoration set from a local server, with SHA-256 checks."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from normlab.data import DataError
from normlab.data import restoration


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / name)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_set5(http_server, tmp_path, monkeypatch):
    """Serve two images as "set5" and point the download source and manifest at them."""
    served = http_server.root / "Set5"
    write_images(served, ["a.png", "b.png"])
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    lines = [f"{sha256(served / name)}  {name}" for name in ("a.png", "b.png")]
    (manifests / "set5.sha256").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(restoration, "MANIFEST_DIR", manifests)
    monkeypatch.setitem(
        restoration.DOWNLOAD_SOURCES, "set5", ("sr/set5", http_server.url + "Set5")
    )
    return http_server


def test_download_fetches_and_loads(fake_set5, tmp_path):
    images = restoration.load_restoration("set5", tmp_path / "data", download=True)
    assert len(images) == 2
    assert images[0].shape == (12, 10, 3)
    folder = tmp_path / "data" / "sr" / "set5"
    assert (folder / "MANIFEST.sha256").is_file()
    assert sorted(fake_set5.requests) == ["/Set5/a.png", "/Set5/b.png"]


def test_download_skips_files_already_present(fake_set5, tmp_path):
    restoration.download_restoration("set5", tmp_path / "data")
    fake_set5.requests.clear()
    restoration.download_restoration("set5", tmp_path / "data")
    assert fake_set5.requests == []


def test_download_rejects_a_bad_checksum(fake_set5, tmp_path):
    manifest = restoration.MANIFEST_DIR / "set5.sha256"
    lines = manifest.read_text().splitlines()
    lines[0] = "0" * 64 + "  a.png"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="checksum mismatch, expected sha256"):
        restoration.download_restoration("set5", tmp_path / "data")
    assert not (tmp_path / "data" / "sr" / "set5" / "a.png").exists()


def test_without_download_nothing_is_requested(fake_set5, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="pass --download"):
        restoration.load_restoration("set5", tmp_path / "data")
    assert fake_set5.requests == []


def test_div2k_has_no_download_source(tmp_path):
    with pytest.raises(DataError, match="div2k cannot be downloaded"):
        restoration.download_restoration("div2k", tmp_path)


def test_shipped_manifests_cover_every_source():
    for name in restoration.DOWNLOAD_SOURCES:
        manifest = restoration.MANIFEST_DIR / f"{name}.sha256"
        expected = restoration.RESTORATION_DATASETS[name].num_images
        assert len(manifest.read_text().splitlines()) == expected, name
