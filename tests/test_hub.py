"""hub=push and python -m finetune.push against a fake Hub on 127.0.0.1 (tests/helpers/fake_hub.py): what arrives
(files, bytes, token, branch, commit message), what the run records, the token never written, and failures that
name the fix, exit 2 and leave the run as it was so the push can be retried."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys

import pytest
import yaml

from helpers.fake_hub import HUB_SECRET, FakeHub, hub_env
from helpers.processes import REPO

REPO_ID = "me/tiny-sentiment"


def push_cli(*args: str, cwd, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.push", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def snapshot(run_dir) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def expected_files(run_dir) -> dict[str, bytes]:
    files = {p.relative_to(run_dir / "model").as_posix(): p.read_bytes()
             for p in (run_dir / "model").rglob("*") if p.is_file()}
    return {**files, "learning_curve.png": (run_dir / "learning_curve.png").read_bytes()}


@pytest.mark.slow
def test_push_uploads_the_verified_export(pushed_run):
    hub, run_dir = pushed_run.hub, pushed_run.run_dir
    assert hub.repos[REPO_ID]["private"]  # hub.private defaults to true
    assert set(hub.repos[REPO_ID]["branches"]) == {"main", "dev"}  # hub.revision=dev: the branch was created
    (commit,) = hub.commits
    assert commit["branch"] == "dev"
    pushed = hub.files(REPO_ID, "dev")
    expected = expected_files(run_dir)
    assert {k: v for k, v in pushed.items() if k != "metrics.json"} == expected  # every file, byte for byte
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(pushed)
    assert hub.lfs  # the weights went through LFS, the small files inline
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the pushed metrics.json is the run's, before the push recorded where it went
    assert json.loads(pushed["metrics.json"]) == {k: v for k, v in metrics.items() if not k.startswith("hub_")}
    assert commit["summary"] == (f"finetune run sentiment/{run_dir.name}: "
                                 f"test_accuracy={metrics['test_accuracy']:.4f}")
    api_calls = [r for r in hub.requests if r["path"].startswith("/api/") and "agent" not in r["path"]]
    assert {r["path"] for r in api_calls} >= {"/api/repos/create", "/api/models/me/tiny-sentiment/branch/dev",
                                              "/api/models/me/tiny-sentiment/commit/dev"}
    assert all(r["headers"].get("authorization") == f"Bearer {HUB_SECRET}" for r in api_calls)


@pytest.mark.slow
def test_run_records_the_push(pushed_run):
    metrics = json.loads((pushed_run.run_dir / "metrics.json").read_text())
    (commit,) = pushed_run.hub.commits
    assert metrics["hub_repo"] == REPO_ID and metrics["hub_revision"] == "dev"
    assert metrics["hub_commit"] == commit["oid"]
    assert metrics["hub_url"] == f"{pushed_run.hub.url}/{REPO_ID}/tree/dev"
    log = (pushed_run.run_dir / "finetune.log").read_text()
    assert f"pushed to {metrics['hub_url']} (commit {commit['oid']})" in log


@pytest.mark.slow
def test_token_is_written_nowhere(pushed_run):
    secret = HUB_SECRET.encode()
    for path in pushed_run.work.rglob("*"):
        if path.is_file() and "hf_home" not in path.parts:
            assert secret not in path.read_bytes(), path
    for name, content in pushed_run.hub.files(REPO_ID, "dev").items():
        assert secret not in content, name
    assert HUB_SECRET not in pushed_run.proc.stderr + pushed_run.proc.stdout


@pytest.mark.slow
def test_model_card_passes_the_card_classes(pushed_run):
    from huggingface_hub import ModelCard

    text = pushed_run.hub.files(REPO_ID, "dev")["README.md"].decode()
    card = ModelCard(text)  # ignore_metadata_errors=False: model-index must parse into EvalResults
    metrics = json.loads((pushed_run.run_dir / "metrics.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == round(metrics["test_accuracy"], 4)
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"


@pytest.mark.slow
def test_export_has_umask_permissions(pushed_run):
    umask = os.umask(0)
    os.umask(umask)
    model = pushed_run.run_dir / "model"
    for path in [model, *model.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


@pytest.mark.slow
def test_push_cli_dry_run_lists_without_network(pushed_run, tmp_path):
    with FakeHub() as hub:
        proc = push_cli(str(pushed_run.run_dir), "--repo-id", "me/other", "--dry-run", cwd=tmp_path,
                        env=hub_env(hub.url, tmp_path, token=None))
        assert proc.returncode == 0, proc.stderr
        assert not hub.requests
    out = proc.stdout + proc.stderr
    assert "dry run: would push" in out and "me/other" in out
    size = (pushed_run.run_dir / "model" / "model.safetensors").stat().st_size
    assert "model.safetensors" in out and f"{size / 1000:.1f} kB" in out


@pytest.fixture
def run_copy(pushed_run, tmp_path):
    import shutil

    run_dir = tmp_path / "sentiment" / pushed_run.run_dir.name
    shutil.copytree(pushed_run.run_dir, run_dir)
    return run_dir


def push_in_process(run_dir, endpoint: str, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """python -m finetune.push in this process (huggingface_hub reads HF_ENDPOINT at import: patch its constant)."""
    import huggingface_hub.constants

    from finetune.push import main

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", HUB_SECRET)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir), "--repo-id", "me/retry", *args])
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("fail, message", [
    ({"/api/repos/create": 403}, "may not write to me/retry (403 Forbidden): use a token with write access to 'me'"),
    ({"/api/models/me/retry/commit": 500}, "the Hub answered 500"),
    (None, "could not reach the Hub at http://127.0.0.1"),
])
def test_push_failure_is_one_line_and_retry_works(run_copy, monkeypatch, capsys, fail, message):
    before = snapshot(run_copy)
    if fail is None:  # connection refused: a port nothing listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
        code, err = push_in_process(run_copy, endpoint, monkeypatch, capsys)
    else:
        with FakeHub(fail=fail) as hub:
            code, err = push_in_process(run_copy, hub.url, monkeypatch, capsys)
    assert code == 2
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert message in line and f"retry with python -m finetune.push {run_copy} --repo-id me/retry" in line
    assert snapshot(run_copy) == before  # nothing changed, nothing half-written
    with FakeHub() as hub:  # the same command, once the Hub answers
        code, err = push_in_process(run_copy, hub.url, monkeypatch, capsys, "--public", "--commit-message", "again")
        assert code == 0, err
        assert hub.commits[0]["summary"] == "again" and not hub.repos["me/retry"]["private"]
        assert set(hub.files("me/retry")) == set(expected_files(run_copy)) | {"metrics.json"}
    assert json.loads((run_copy / "metrics.json").read_text())["hub_commit"] == hub.commits[0]["oid"]


def test_push_cli_failure_exits_2(run_copy, monkeypatch, capsys):
    before = snapshot(run_copy)
    with FakeHub(fail={"/api/repos/create": 401}) as hub:
        code, err = push_in_process(run_copy, hub.url, monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: push to me/retry failed: the Hub rejected the token (401 Unauthorized): set HF_TOKEN to a valid token "
        f"or run `hf auth login`; the run in {run_copy} is intact, retry with python -m finetune.push {run_copy} "
        "--repo-id me/retry")
    assert snapshot(run_copy) == before


@pytest.mark.usefixtures("sentiment_csv")  # tmp_path/reviews.csv
def test_run_with_push_refuses_to_start_without_token(tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants

    from helpers.cli import fail

    monkeypatch.setenv("HF_TOKEN", "")  # no token: none in the environment, no login cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("finetune.tasks.base.Task.load_tokenizer", lambda *a: pytest.fail("loaded before the check"))
    args = ["data=reviews.csv", "data.text_column=review", "data.label_column=sentiment", "hub=push", "hub.repo_id=me/x"]
    assert fail(args, tmp_path, monkeypatch, capfd).startswith("pushing to the Hub needs a token: set HF_TOKEN or "
                                                               "run `hf auth login`")  # refused before loading anything


@pytest.mark.parametrize("repo_id, message", [
    (None, "hub=push needs a repository: set hub.repo_id=<namespace>/<name>"),
    ("me/bad name!", "hub.repo_id 'me/bad name!' is not a valid Hub repository id"),
    ("noslash", "hub.repo_id 'noslash' has no namespace"),
])
def test_repo_id_is_checked_before_training(repo_id, message):
    from finetune.config import HubConfig
    from finetune.errors import FinetuneError
    from finetune.validate import hub

    with pytest.raises(FinetuneError, match=re.escape(message)):
        hub(HubConfig(push=True, repo_id=repo_id))


def test_hub_configs_compose():
    from helpers.cli import compose_cfg

    cfg = compose_cfg("hub=push", "hub.repo_id=me/x", "hub.revision=dev", "hub.dry_run=true")
    assert cfg.hub.push and cfg.hub.private and cfg.hub.revision == "dev" and cfg.hub.dry_run
    assert not compose_cfg().hub.push
    assert yaml.safe_load((REPO / "configs" / "hub" / "push.yaml").read_text())["push"] is True


def test_a_push_killed_midway_is_retried_into_one_complete_commit(run_copy, tmp_path, monkeypatch, capsys):
    """SIGKILL while the weights are on their way (the fake Hub holds their upload): no commit, the run as it was, a
    staging folder left behind; the same command again makes one commit of everything and removes that folder."""
    before = snapshot(run_copy)
    staging = f".{run_copy.name}-push-*"
    with FakeHub(hold={"/lfs/": "before"}) as hub:
        proc = subprocess.Popen([sys.executable, "-m", "finetune.push", str(run_copy), "--repo-id", "me/retry"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO), **hub_env(hub.url, tmp_path / "home")})
        try:
            assert hub.holding.wait(timeout=240), proc.stderr.read() if proc.poll() is not None else "no upload"
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        hub.hold, _ = {}, hub.release.set()
        assert hub.commits == [] and snapshot(run_copy) == before
        assert list(run_copy.parent.glob(staging))  # what the killed push left beside the run
        code, err = push_in_process(run_copy, hub.url, monkeypatch, capsys)
        assert code == 0, err
        (commit,) = hub.commits
        assert set(commit["files"]) == set(expected_files(run_copy)) | {"metrics.json"}
        assert {k: v for k, v in hub.files("me/retry").items() if k != "metrics.json"} == expected_files(run_copy)
    assert json.loads((run_copy / "metrics.json").read_text())["hub_commit"] == commit["oid"]
    assert not list(run_copy.parent.glob(staging))


def test_a_push_stopped_after_its_commit_is_not_committed_twice(run_copy, monkeypatch, capsys):
    """Stopped (Ctrl-C) after the Hub made the commit, before metrics.json recorded it: the retry sends nothing again,
    makes no second commit and records the first."""
    from finetune import report

    record = report.write_json

    def interrupted(*args):
        raise KeyboardInterrupt

    with FakeHub() as hub:
        monkeypatch.setattr(report, "write_json", interrupted)
        with pytest.raises(KeyboardInterrupt):
            push_in_process(run_copy, hub.url, monkeypatch, capsys)
        (commit,) = hub.commits
        monkeypatch.setattr(report, "write_json", record)
        uploads = len([r for r in hub.requests if r["path"].startswith("/lfs/")])
        code, err = push_in_process(run_copy, hub.url, monkeypatch, capsys)
        assert code == 0, err
        assert hub.commits == [commit]  # still one commit
        assert len([r for r in hub.requests if r["path"].startswith("/lfs/")]) == uploads  # the weights not sent again
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["hub_commit"] == commit["oid"] and metrics["hub_revision"] == "main"
    assert not list(run_copy.parent.glob(f".{run_copy.name}-push-*"))
