"""A bundled asset of the tests' own, fetched without a network: its "download" is a zip built on the spot."""

from __future__ import annotations

from pathlib import Path

from finetune import assets


def local_asset(tmp_path, monkeypatch, payload: bytes = b"0" * 200_000, disk=None) -> assets.Asset:
    """A bundled asset 'tiny' whose download is a zip built here (its data compresses to almost nothing)."""
    import hashlib
    import shutil
    import zipfile

    wheel = tmp_path / "src" / "tiny-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("tiny/data.bin", payload)
        zf.writestr("tiny/config.json", "{}")
    asset = assets.Asset("tiny", "tiny", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(),
                         {"tiny/data.bin": "data.bin", "tiny/config.json": "config.json"}, size=wheel.stat().st_size,
                         disk=disk)
    monkeypatch.setitem(assets.ASSETS, "tiny", asset)

    def download(asset, tmp, bar):
        (tmp / "download").mkdir()
        return Path(shutil.copy(wheel, tmp / "download" / wheel.name))

    monkeypatch.setattr(assets, "_download", download)
    return asset
