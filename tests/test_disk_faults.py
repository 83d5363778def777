"""A write that fails while a run saves a checkpoint (a full disk, a quota, a read-only place): one line naming the
checkpoint and what it takes, the partial checkpoint gone, the earlier ones intact and resumable; a checkpoint whose
weights or optimizer file was cut short is skipped, with a warning, for the one before."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest

from finetune.engines import CHECKPOINTS, last_checkpoint
from finetune.errors import FinetuneError
from helpers.cli import cli_main, engine_for
from helpers.processes import ENV

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINER = ["trainer.num_train_epochs=2", "trainer.learning_rate=1e-3", "trainer.per_device_train_batch_size=16",
           "trainer.eval_strategy=steps", "trainer.eval_steps=2", "trainer.save_total_limit=10", "trainer.report_to=[]"]


def _args(tiny_bert, sentiment_csv, engine):
    return ["task=sentiment", f"model={tiny_bert}", f"data={sentiment_csv}", "data.text_column=review",
            "data.label_column=sentiment", f"trainer={engine}", *TRAINER]


def _fail_writes_into(monkeypatch, checkpoint: str):
    """torch.save, which both engines write the optimizer's state with, fails with ENOSPC inside `checkpoint`."""
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if checkpoint in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("engine", ["hf", "accelerate"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_earlier_ones_stay(engine, tiny_bert, sentiment_csv,
                                                                                  tmp_path, monkeypatch):
    out = tmp_path / "run"
    trained = engine_for(out, *_args(tiny_bert, sentiment_csv, engine))
    _fail_writes_into(monkeypatch, "checkpoint-6")
    with pytest.raises(FinetuneError) as failed:
        trained.train()
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"cannot write the checkpoint {out / CHECKPOINTS}")
    assert "No space left on device" in message and "MB; free that much there" in message
    kept = sorted(p.name for p in (out / CHECKPOINTS).iterdir())
    assert kept == ["checkpoint-2", "checkpoint-4"]  # no partial one (nor its temp dir)
    assert last_checkpoint(out) == out / CHECKPOINTS / "checkpoint-4"


def test_the_command_line_keeps_a_run_with_checkpoints_when_a_write_fails(tiny_bert, sentiment_csv, tmp_path,
                                                                        monkeypatch, capfd):
    _fail_writes_into(monkeypatch, "checkpoint-6")
    code, _, err = cli_main(_args(tiny_bert, sentiment_csv, "accelerate"), tmp_path, monkeypatch, capfd)
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err
    (run_dir,) = list((tmp_path / "runs" / "sentiment").iterdir())
    assert line.endswith(f"; resume with resume={run_dir} once it is fixed")
    assert last_checkpoint(run_dir) == run_dir / CHECKPOINTS / "checkpoint-4"


def test_a_cut_short_weights_or_optimizer_file_is_skipped_for_the_checkpoint_before(tiny_bert, sentiment_csv,
                                                                                  tmp_path, caplog):
    out = tmp_path / "run"
    engine_for(out, *_args(tiny_bert, sentiment_csv, "accelerate")).train()
    folder = out / CHECKPOINTS
    steps = sorted(int(p.name.split("-")[1]) for p in folder.iterdir())
    newest, previous = (folder / f"checkpoint-{s}" for s in steps[-1:-3:-1])
    assert last_checkpoint(out) == newest
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with caplog.at_level(logging.WARNING):
        assert last_checkpoint(out) == previous
    assert f"skipping {newest}: model.safetensors is cut short or corrupt" in caplog.text
    optimizer = previous / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    assert last_checkpoint(out) == folder / f"checkpoint-{steps[-3]}"


@pytest.mark.slow
def test_a_full_disk_in_a_size_limited_directory(tiny_bert, sentiment_csv, tmp_path):
    """A real full disk: the run directory on a 1 MB tmpfs (in a mount namespace of its own)."""
    if subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True).returncode:
        pytest.skip("this machine allows no mount namespace for a size-limited directory")
    runs = tmp_path / "small"
    runs.mkdir()
    cli = " ".join(["exec", sys.executable, "-m", "finetune", *_args(tiny_bert, sentiment_csv, "accelerate"),
                    f"runs_dir={runs}"])
    proc = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                           f"mount -t tmpfs -o size=1m tmpfs {runs} && {cli}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **ENV})
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in proc.stderr and ("No space left on device" in line or "no space left" in line), line
