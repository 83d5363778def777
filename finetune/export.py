"""Export a pipeline-loadable model directory atomically, with a model card, then verify it.

model/ = safetensors weights + tokenizer + config.json (id2label) + README.md (model card with
YAML metadata and results). It is written to a temp dir beside its target and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune import adapters, assets

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """The exported pipeline does not reproduce the trainer's score: the export is not trustworthy."""


def export(model, tokenizer, task, cfg, metrics: dict[str, float], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        adapters.save_adapter(model, tmp / "adapter", _base_model(cfg))  # only for peft runs
        adapters.merge(model).save_pretrained(tmp)  # adapters folded in: loads without peft
        tokenizer.save_pretrained(tmp)
        task.export(tmp)
        model_card(task, cfg, metrics).save(tmp / "README.md")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def verify(task, model_dir: Path, raw_test, trainer_metrics: dict[str, float], tolerance: float) -> dict[str, float]:
    """Score the test split through transformers.pipeline and compare with the trainer's figure."""
    scores = task.verify(model_dir, raw_test)
    key = task.verify_metric or task.main_metric
    tolerance = max(tolerance, getattr(task, "verify_tolerance", 0.0))
    expected, got = trainer_metrics[f"test_{key}"], scores[key]
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
- max sequence length: {cfg.task.max_seq_length}; PEFT: {cfg.peft.method}{f" (r={cfg.peft.r})" if cfg.peft.method != "none" else ""}
{adapters.card_section(cfg, task, base)}{task.card_section()}"""
    return ModelCard(content)


def _is_local(source: Any) -> bool:
    return source is None or assets.is_bundled(str(source)) or Path(str(source)).expanduser().exists()


def _is_metric(key: str) -> bool:
    return not any(s in key for s in ("runtime", "per_second", "epoch", "total_flos", "preparation_time"))
