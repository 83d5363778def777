"""Where model= and data= point -- a local path, a bundled asset or a Hub id -- and the mistakes that can be told
without loading any library: a path that is not there, a Hub id that cannot load because the Hub is unreachable and no
cache holds it. The command line checks these before the imports that take seconds (check());
the loaders check them again, for the other commands and for what only the task knows (its own file formats).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune import assets
from finetune.config import config_options, did_you_mean
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from omegaconf import DictConfig

SPLITS = ("train", "validation", "test")
COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def file_format(path: str | Path) -> str:
    """The data format of a file, looking through a compression suffix: 'data.csv.bz2' -> '.csv'."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def data_hub_id(data: DictConfig, task_formats: frozenset[str] = frozenset(), fetch: bool = True) -> str | None:
    """The Hub dataset id data= names, or None for local files. data.*_file must be files; a data.source that names
    a file (a path, or a data file's suffix) must exist (a bundled one is fetched to be checked, unless fetch=False)."""
    files = {s: getattr(data, f"{s}_file") for s in SPLITS if getattr(data, f"{s}_file")}
    for split, f in files.items():
        if not Path(f).expanduser().is_file():
            raise FinetuneError(f"data.{split}_file not found: {f}; check the path")
    if files or not data.source or (assets.is_bundled(data.source) and not fetch):
        return None
    source = assets.resolve(data.source)
    if Path(source).expanduser().is_file() or Path(source).expanduser().is_dir():
        return None
    if assets.looks_like_path(source) or file_format(source) in {*BUILDERS, *task_formats}:
        raise FinetuneError(f"data file or directory not found: {source}; check the path")
    return source


def hub_offline(name: str, path: str) -> str | None:
    """For a model that is no local directory: why the Hub cannot be reached (None when it can). None for a local
    checkpoint directory; a FinetuneError for a file, or for a path that is not there."""
    local = Path(path).expanduser()
    if local.is_file():
        raise FinetuneError(f"model={name} is a file; pass the checkpoint directory (the one holding config.json)")
    if local.is_dir():
        return None
    if assets.looks_like_path(path):
        raise FinetuneError(f"model directory not found: {name}; check the path")
    return assets.hub_unreachable()


def model_error(name: str, reason: str, offline: str | None) -> FinetuneError:
    hint = f"{did_you_mean('model', name)}pass model=<config name in configs/model " \
           f"({', '.join(config_options('model'))}), local checkpoint directory or Hub id>"
    if offline:
        return FinetuneError(f"model '{name}' is not a local directory and the Hub ({assets.hub_endpoint()}) is "
                             f"unreachable ({offline}), nor is it in the Hub cache; {hint}")
    return FinetuneError(f"could not load model '{name}' ({reason}); {hint}")


def data_error(name: str, reason: str, offline: str | None) -> FinetuneError:
    hint = f"{did_you_mean('data', name)}pass data=<config name in configs/data, file, directory or Hub id>"
    if offline:
        return FinetuneError(f"data '{name}' is not a local file or directory and the Hub ({assets.hub_endpoint()}) "
                             f"is unreachable ({offline}), nor is it in the datasets cache; {hint}")
    return FinetuneError(f"could not load data '{name}': not a local file or directory, nor a Hub dataset "
                         f"({reason}); {hint}")


def _dataset_cached(name: str) -> bool:
    """Whether a cache may hold Hub dataset `name`: an entry of the datasets or the Hub cache named after it (loose on
    purpose: only a name found in neither is refused early; datasets itself decides the rest)."""
    from datasets import config  # a second to import: only when the Hub is unreachable
    from huggingface_hub import constants

    def key(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    wanted = key(name.rsplit("/", 1)[-1])
    roots = [Path(config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
    return any(wanted in key(p.name) for root in roots if root.is_dir() for p in root.iterdir())


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id: nothing of it can be cached
        return False


def check(cfg: DictConfig) -> None:
    """The command line's model= and data=, before the libraries load (bundled assets are fetched later, by the run)."""
    name = str(cfg.model.name_or_path)
    if not assets.is_bundled(name):
        offline = hub_offline(name, name)
        if offline and not _in_hub_cache(name, cfg.model.revision):
            raise model_error(name, "", offline)
    dataset = data_hub_id(cfg.data, fetch=False)
    offline = assets.hub_unreachable() if dataset else None
    if offline and not _dataset_cached(dataset):
        raise data_error(dataset, "", offline)
