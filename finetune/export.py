"""Export a pipeline-loadable model directory atomically, with a model card, then verify it.

model/ = safetensors weights + tokenizer + config.json (id2label) + README.md (model card with
YAML metadata and results). It is written to a temp dir beside its target and renamed into place, with
the permissions the user's umask gives (a temp dir is private: 0700).

config.json gets a "finetune" entry: the task config, its main metric and the data column names the model was
trained with, so `finetune.predict` / `finetune.evaluate` can rebuild the task from the exported directory alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune import adapters, assets
from finetune.errors import FinetuneError, VerificationError

log = logging.getLogger(__name__)


def export(model, tokenizer, task, cfg, metrics: dict[str, float], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        adapters.save_adapter(model, tmp / "adapter", _base_model(cfg))  # only for peft runs
        adapters.merge(model).save_pretrained(tmp)  # adapters folded in: loads without peft
        tokenizer.save_pretrained(tmp)
        task.export(tmp)
        _record_task(tmp, task, cfg)
        card = model_card(task, cfg, metrics)
        check_card(card)
        card.save(tmp / "README.md")
        _umask_permissions(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _record_task(model_dir: Path, task, cfg) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["finetune"] = {"task": OmegaConf.to_container(cfg.task, resolve=True), "main_metric": task.main_metric,
                          "data": {field: cfg.data[field] for field in task.recorded_columns() if field in cfg.data}}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_record(model_dir: Path) -> dict[str, Any]:
    """The "finetune" entry of an exported model's config.json (see the module docstring)."""
    config = model_dir / "config.json"
    record = json.loads(config.read_text()).get("finetune") if config.is_file() else None
    if not record:
        raise FinetuneError(f"{model_dir} is not a model directory exported by finetune (its config.json has no "
                            "'finetune' entry); pass a run directory or its model/ directory")
    return record


def model_dir_of(path: str | Path) -> Path:
    """A model directory given itself or its run directory."""
    path = Path(path).expanduser()
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise FinetuneError(f"no exported model in {path}: pass a finished run directory or its model/ directory")
    return path


def _umask_permissions(root: Path) -> None:
    """Give the export the permissions a plain mkdir / open would (tempfile makes the dir 0700, files may be 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def verify(task, model_dir: Path, raw_test, trainer_metrics: dict[str, float], tolerance: float) -> dict[str, float]:
    """Score the test split through transformers.pipeline and compare with the trainer's figure."""
    scores = task.verify(model_dir, raw_test)
    key = task.verify_metric or task.main_metric
    expected, got = trainer_metrics[f"test_{key}"], scores[key]
    tolerance = max(tolerance, task.verify_tolerance, task.verify_relative_tolerance * abs(expected))
    if abs(expected - got) > tolerance:
        raise VerificationError(
            f"exported pipeline scores test {key}={got:.4f} but the trainer measured {expected:.4f} "
            f"(tolerance {tolerance}); the exported model in {model_dir} does not reproduce training"
        )
    log.info("verified: pipeline test %s %.4f vs trainer %.4f", key, got, expected)
    return {f"pipeline_test_{k}": v for k, v in scores.items()}


def _base_model(cfg) -> str | None:
    """A Hub id for the card's base_model, or None for a local checkpoint."""
    if cfg.model.base_model:
        return cfg.model.base_model
    name = cfg.model.name_or_path
    if assets.is_bundled(name) or Path(name).expanduser().exists():
        return None
    return name


def model_card(task, cfg, metrics: dict[str, float]):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = cfg.data.dataset_name or (None if _is_local(cfg.data.source) else cfg.data.source)
    base = _base_model(cfg)
    name = f"{(base or 'model').split('/')[-1]}-finetuned-{task.pipeline_task}"
    results = [
        EvalResult(
            task_type=task.pipeline_task,
            dataset_type=dataset or "custom",
            dataset_name=dataset or "custom data",
            dataset_split="test",
            metric_type=key.removeprefix("test_"),
            metric_value=round(value, 4),
        )
        for key, value in metrics.items()
        if key.startswith("test_") and isinstance(value, float) and _is_metric(key)
    ]
    data = ModelCardData(
        model_name=name,
        base_model=base,
        datasets=[dataset] if dataset else None,
        license=cfg.model.license,
        library_name="transformers",
        pipeline_tag=task.pipeline_task,
        tags=["finetune", task.pipeline_task],
        metrics=sorted({r.metric_type for r in results}) or None,
        eval_results=results or None,
    )
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, float) and _is_metric(k))
    hp = cfg.trainer
    remote = ", trust_remote_code=True" if getattr(task, "pipeline_needs_remote_code", False) else ""  # shipped code
    content = f"""---
{data.to_yaml()}
---

# {name}

Fine-tuned from {f"[{base}](https://huggingface.co/{base})" if base else f"`{cfg.model.name_or_path}`"} for
`{task.pipeline_task}` on {dataset or "custom data"} with finetune.

## Use

```python
from transformers import pipeline
pipe = pipeline("{task.pipeline_task}", model="path/to/this/directory"{remote})
```

## Results

| metric | value |
|---|---|
{rows}

## Training

- engine: {hp.engine}, epochs: {hp.num_train_epochs}, learning rate: {hp.learning_rate}, batch size: {hp.per_device_train_batch_size}, seed: {cfg.seed}
- optimizer: {_optimizer(cfg)}
- max sequence length: {task.max_length}; PEFT: {cfg.peft.method}{f" (r={cfg.peft.r})" if cfg.peft.method != "none" else ""}
{adapters.card_section(cfg, task, base)}{task.card_section()}"""
    return ModelCard(content)


def check_card(card) -> None:
    """Refuse a card whose metadata the Hub would reject, checked locally with huggingface_hub's card classes:
    RepoCard.validate() would send it to the Hub (a hard-coded endpoint), which a run must not need."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        # parsing the text back checks the YAML block (a dict) and turns model-index into EvalResults
        data = ModelCard(str(card)).data
        for repo in [*_as_list(data.base_model), *_as_list(data.datasets)]:
            validate_repo_id(repo)
    except (ValueError, HFValidationError) as e:
        raise ValueError(f"the model card's metadata would be rejected by the Hub: {e}") from e
    if data.to_dict() != card.data.to_dict():
        raise ValueError("the model card's metadata does not read back as written")


def _optimizer(cfg) -> str:
    """The model card's line about trainer.optim (finetune/optim.py)."""
    t = cfg.trainer
    args = OmegaConf.to_container(t.optim_args) if OmegaConf.is_config(t.optim_args) else dict(t.optim_args)
    parts = [t.optim + (f" ({', '.join(f'{k}={v}' for k, v in args.items())})" if args else "")]
    if cfg.model.dtype == "bfloat16" and cfg.peft.method == "none":
        parts.append("bfloat16 weights rounded stochastically")
    if t.optimizer_in_backward:
        parts.append("step inside the backward pass")
    return ", ".join(parts)


def _as_list(value: Any) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _is_local(source: Any) -> bool:
    return source is None or assets.is_bundled(str(source)) or Path(str(source)).expanduser().exists()


def _is_metric(key: str) -> bool:
    return not any(s in key for s in ("runtime", "per_second", "epoch", "total_flos", "preparation_time", "num_"))
