"""Faults a long run meets, injected, and what survives them: a full disk at the export (one line, exit 2, the
checkpoints intact, nothing half-written, the run resumed afterwards). The export's own part (a killed export's
leftovers, too little room): tests/test_export.py; a checkpoint that cannot be written: tests/test_disk_faults.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from helpers.cli import TINY_TRAINER, cli_main
from helpers.data import file_hashes, make_sentences

from finetune.engines import CHECKPOINTS


@pytest.fixture
def reviews(tmp_path):
    import pandas as pd

    pd.DataFrame(make_sentences(160), columns=["review", "sentiment"]).to_csv(tmp_path / "reviews.csv", index=False)
    return ["data=reviews.csv", "data.text_column=review", "data.label_column=sentiment"]


@pytest.mark.slow
def test_a_full_disk_at_the_export_keeps_the_checkpoints_and_the_run_resumes(tiny_bert, reviews, tmp_path,
                                                                             monkeypatch, capfd, one_thread):
    import safetensors.torch
    import transformers.modeling_utils


    real_save = safetensors.torch.save_file
    seen = {}

    def save(tensors, filename, *args, **kwargs):  # the checkpoints are written; the export's weights find no room
        if "/.model-" not in str(filename):
            return real_save(tensors, filename, *args, **kwargs)
        run_dir = os.path.dirname(os.path.dirname(filename))
        seen["checkpoints"] = file_hashes(Path(run_dir) / CHECKPOINTS)
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save)
    args = ["task=sentiment", f"model={tiny_bert}", *reviews, *TINY_TRAINER, "trainer.num_train_epochs=1"]
    code, _, err = cli_main(args, tmp_path, monkeypatch, capfd)
    assert code == 2, err[-3000:]
    (run_dir,) = (tmp_path / "runs" / "sentiment").iterdir()
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert "Traceback" not in err
    assert line.startswith(f"error: no space left on device writing the exported model to {run_dir / 'model'}: it "
                           "needs about ") and line.endswith(
        f"free there; free some space there; resume with resume={run_dir} once it is fixed")
    assert "MB" in line or "kB" in line
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model-*"))  # nothing half-written
    assert seen["checkpoints"] and file_hashes(run_dir / CHECKPOINTS) == seen["checkpoints"]  # intact, byte for byte
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)  # room again
    code, _, err = cli_main([*args, f"resume={run_dir}"], tmp_path, monkeypatch, capfd)
    assert code == 0, err[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "metrics.json").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())  # the estimate made before training, by the peak
    assert metrics["memory_available_mb"] > metrics["memory_estimate_mb"] > metrics["memory_estimate_parts_mb"]["weights"]
    assert metrics["peak_memory_mb"] > 0
    assert list((tmp_path / "runs" / "sentiment").iterdir()) == [run_dir]
