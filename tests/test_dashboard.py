"""optuna-dashboard (finetune[dashboard]) over a sweep's study: its HTTP API lists the trials with states and values."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_S = 60  # a busy 2-core machine: the server imports optuna and bottle before it listens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float, server: subprocess.Popen) -> dict:
    """GET url as JSON, retrying until the server listens or the deadline passes."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError) as e:
            if server.poll() is not None:
                raise AssertionError(f"optuna-dashboard exited with {server.returncode}: "
                                     f"{server.stderr.read()[-2000:]}") from e
            if time.monotonic() > deadline:
                raise AssertionError(f"optuna-dashboard did not answer {url} within {STARTUP_S} s") from e
            time.sleep(0.2)


@pytest.mark.slow
def test_dashboard_lists_the_trials_of_a_finished_study(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="search", storage=storage, direction="maximize")
    lr = {"trainer.learning_rate": FloatDistribution(1e-5, 1e-2, log=True)}
    study.add_trial(create_trial(params={"trainer.learning_rate": 1e-3}, distributions=lr, value=0.81,
                                 intermediate_values={1: 0.7, 2: 0.81}))
    study.add_trial(create_trial(params={"trainer.learning_rate": 1e-5}, distributions=lr, state=TrialState.PRUNED,
                                 intermediate_values={1: 0.5955}))
    study.add_trial(create_trial(params={"trainer.learning_rate": 1e-2}, distributions=lr, state=TrialState.FAIL))

    port = _free_port()
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1",
               "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        studies = _get(f"http://127.0.0.1:{port}/api/studies", deadline, server)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["search"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", deadline, server)
        trials = [(t["number"], t["state"], t.get("values"), [v["value"] for v in t["intermediate_values"]])
                  for t in detail["trials"]]
        assert trials == [(0, "Complete", [0.81], [0.7, 0.81]), (1, "Pruned", None, [0.5955]),
                          (2, "Fail", None, [])]
        assert [t["number"] for t in detail["best_trials"]] == [0]
    finally:
        server.kill()
        server.wait(timeout=30)
