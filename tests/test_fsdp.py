"""trainer.fsdp=true: FSDP2 over 2 CPU processes (torchrun, gloo). The sharded model is gathered for the export, which
passes the pipeline check and holds the weights of an unsharded single-process run of the same seed, data and
effective batch; sharded checkpoints resume a killed run; LoRA's merged weights and adapter are gathered too."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.processes import kill_and_resume, start

# 128 training rows, effective batch 8 (2 processes x 4, or 1 x 8) in random order without length grouping (so the
# two processes' halves of a batch make the single process's batch); evaluated and checkpointed every 8 steps
TRAINER = ["trainer=accelerate", "trainer.learning_rate=3e-3", "trainer.warmup_ratio=0", "trainer.group_by_length=false",
           "trainer.eval_strategy=steps", "trainer.eval_steps=8", "trainer.logging_steps=8"]
SHARDED = ["trainer.fsdp=true", "trainer.per_device_train_batch_size=4"]
SINGLE = ["trainer.per_device_train_batch_size=8"]
TOLERANCE = 1e-4  # splitting a batch over processes changes float sums: 3.7e-5 after 64 steps (same with DDP)


@pytest.fixture
def work(sentiment_csv, tiny_bert):
    tmp_path = sentiment_csv.parent
    # without dropout, whose masks differ between one process and two, both runs compute the same function
    model = shutil.copytree(tiny_bert, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return tmp_path


def _args(work: Path, *extra: str) -> list[str]:
    return ["task=sentiment", f"model={work / 'model'}", f"data={work / 'reviews.csv'}", "data.text_column=review",
            "data.label_column=sentiment", *TRAINER, *extra]


def _unsharded(work: Path, *args: str) -> Path:
    """The same training in this process, unsharded (while the sharded launch runs)."""
    from finetune.run import run
    from helpers.cli import compose_cfg

    run(compose_cfg(*args), work / "single")
    return work / "single"


def _finish(proc: subprocess.Popen, work: Path, log: str) -> Path:
    assert proc.wait(timeout=300) == 0, (work / log).read_text()[-4000:]
    (run_dir,) = [p.parent.parent for p in work.glob(f"{Path(log).stem}/sentiment/*/model/config.json")]
    return run_dir


def _weights(directory: Path):
    from safetensors.torch import load_file

    (file,) = [f for f in directory.iterdir() if f.suffix == ".safetensors"]
    return load_file(file)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_sharded_run_resumed_after_a_kill_exports_the_unsharded_weights(work, one_thread):
    from finetune.engines import last_checkpoint

    def both_shards(run_dir: Path) -> None:  # both processes wrote their shard of the model and optimizer
        shards = {p.name for p in (last_checkpoint(run_dir) / "sharded").glob("*.distcp")}
        assert shards == {"__0_0.distcp", "__1_0.distcp"}

    sharded = [*_args(work, *SHARDED), "trainer.num_train_epochs=4"]
    resumed = kill_and_resume(sharded, work, "sentiment", 16, processes=2, killed=both_shards,
                              reference=lambda: _unsharded(work, *_args(work, *SINGLE), "trainer.num_train_epochs=4"))
    run_dir, reference = resumed.run_dir, resumed.reference
    assert 16 <= resumed.step < 64, resumed.step  # continued mid-run from a sharded checkpoint
    assert "restored the best checkpoint" in resumed.log and "gathered the sharded model's" in resumed.log

    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert metrics["pipeline_test_accuracy"] == metrics["test_accuracy"] == expected["test_accuracy"]
    assert metrics["test_loss"] == pytest.approx(expected["test_loss"], abs=1e-4)
    exported, unsharded = _weights(run_dir / "model"), _weights(reference / "model")
    difference = _max_difference(exported, unsharded)
    print(f"max |sharded - unsharded| = {difference:.3g}")
    assert difference < TOLERANCE
    base = _weights(work / "model")  # training moved the weights far more than the tolerance
    assert max((exported[k] - base[k.removeprefix("bert.")]).abs().max().item()
               for k in exported if k.removeprefix("bert.") in base) > 100 * TOLERANCE


@pytest.mark.slow
def test_sharded_lora_exports_gathered_merged_weights_and_adapter(work, one_thread):
    lora = ["peft=lora", "peft.r=4", "trainer.num_train_epochs=2"]
    launch = start([*_args(work, *SHARDED, *lora), "runs_dir=sharded"], work, work / "sharded.log", processes=2)
    reference = _unsharded(work, *_args(work, *SINGLE, *lora))
    sharded = _finish(launch, work, "sharded.log")
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["pipeline_test_accuracy"] == metrics["test_accuracy"]
    merged, adapter = _weights(sharded / "model"), _weights(sharded / "model" / "adapter")
    assert not any("lora" in k for k in merged) and any("lora_B" in k for k in adapter)
    difference = max(_max_difference(merged, _weights(reference / "model")),
                     _max_difference(adapter, _weights(reference / "model" / "adapter")))
    print(f"max |sharded - unsharded| (LoRA merged + adapter) = {difference:.3g}")
    assert difference < TOLERANCE
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 100 * TOLERANCE  # B starts at 0


@pytest.mark.parametrize("kind, use_fsdp, fsdp, engine, error", [
    ("NO", "false", True, "hf", "trainer.fsdp=true .* needs trainer=accelerate"),
    ("NO", "false", True, "accelerate", "but this is a single process: launch several"),
    ("MULTI_GPU", "false", True, "accelerate", "on GPUs launch with accelerate's FSDP config .*fsdp.yaml"),
    ("MULTI_CPU", "true", False, "hf", "accelerate applies an FSDP config on GPUs only .* trainer.fsdp=true"),
    ("MULTI_CPU", "true", True, "accelerate", None),  # fsdp.yaml on CPUs with trainer.fsdp=true: finetune's FSDP2
    ("MULTI_CPU", "false", True, "accelerate", None),
])
def test_where_fsdp_applies(kind, use_fsdp, fsdp, engine, error, monkeypatch):
    from types import SimpleNamespace

    import accelerate
    from accelerate.utils import DistributedType

    from finetune.validate import fsdp as check_fsdp
    from finetune.errors import FinetuneError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", use_fsdp)  # what `accelerate launch` sets for an FSDP config
    monkeypatch.setattr(accelerate, "PartialState", lambda: SimpleNamespace(distributed_type=DistributedType[kind]))
    trainer = SimpleNamespace(fsdp=fsdp, engine=engine)
    if error is None:
        check_fsdp(trainer)
    else:
        with pytest.raises(FinetuneError, match=error):
            check_fsdp(trainer)
