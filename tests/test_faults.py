"""Faults a long run meets, injected, and what survives them: a full disk at the export (one line, exit 2, the
checkpoints intact, nothing half-written, the run resumed afterwards)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from conftest import TINY_TRAINER, make_sentences


@pytest.fixture
def reviews(tmp_path):
    import pandas as pd

    pd.DataFrame(make_sentences(160), columns=["review", "sentiment"]).to_csv(tmp_path / "reviews.csv", index=False)
    return ["data=reviews.csv", "data.text_column=review", "data.label_column=sentiment"]


def tree(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_full_disk_at_the_export_keeps_the_checkpoints_and_the_run_resumes(tiny_bert, reviews, tmp_path,
                                                                             monkeypatch, capfd, one_thread):
    import safetensors.torch
    import transformers.modeling_utils

    from finetune.engines import CHECKPOINTS
    from helpers import cli_main

    real_save = safetensors.torch.save_file
    seen = {}

    def save(tensors, filename, *args, **kwargs):  # the checkpoints are written; the export's weights find no room
        if "/.model-" not in str(filename):
            return real_save(tensors, filename, *args, **kwargs)
        run_dir = os.path.dirname(os.path.dirname(filename))
        seen["checkpoints"] = tree(__import__("pathlib").Path(run_dir) / CHECKPOINTS)
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
        f"free there; free some space, then run the same command with resume={run_dir} (its checkpoints are intact)")
    assert "MB" in line or "kB" in line
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model-*"))  # nothing half-written
    assert seen["checkpoints"] and tree(run_dir / CHECKPOINTS) == seen["checkpoints"]  # intact, byte for byte
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)  # room again
    code, _, err = cli_main([*args, f"resume={run_dir}"], tmp_path, monkeypatch, capfd)
    assert code == 0, err[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "metrics.json").is_file()
    assert list((tmp_path / "runs" / "sentiment").iterdir()) == [run_dir]


def test_a_killed_exports_temp_dir_is_removed_and_an_earlier_export_replaced_whole(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.export import export
    from helpers import compose_cfg
    from test_export import _Task

    cfg = compose_cfg(f"model={tiny_bert}")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    stale = tmp_path / ".model-k1ll3d"  # a kill mid-export left it
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    export(model, tokenizer, _Task(), cfg, {}, tmp_path / "model")
    first = tree(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    (tmp_path / "model" / "extra.txt").write_text("from the first export")
    export(model, tokenizer, _Task(), cfg, {}, tmp_path / "model")  # a resumed run exports again
    assert tree(tmp_path / "model") == first and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_too_little_room_for_the_export_is_refused_before_writing(tmp_path, tiny_bert, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune import disk
    from finetune.errors import FinetuneError
    from finetune.export import export
    from helpers import compose_cfg
    from test_export import _Task

    cfg = compose_cfg(f"model={tiny_bert}")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    with pytest.raises(FinetuneError) as info:
        export(model, AutoTokenizer.from_pretrained(tiny_bert), _Task(), cfg, {}, tmp_path / "model")
    assert str(info.value) == (f"not enough space to write the exported model to {tmp_path}: it needs about "
                               f"{disk.size(weights)}, 1.0 kB free there; free some space and run again")
    assert list(tmp_path.iterdir()) == []
