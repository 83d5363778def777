"""The CLI in this process: compose the real config tree the way it does, or call its entry point with argv."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from finetune.__main__ import rewrite_overrides
from finetune.config import CONFIG_DIR, register_configs


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        return compose("config", overrides=rewrite_overrides(list(overrides)))


def cli_main(args: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    """`python -m finetune <args>` run from `cwd` in this process (finetune.__main__.main with sys.argv set): the
    same path without paying for the imports each time. Returns (exit code, stdout, stderr)."""
    from finetune import __main__ as cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["finetune", *args])
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # the CLI re-points sys.stderr: restore it after the test
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:  # a run's console and log-file handlers (Hydra's job logging) must not outlive the captured streams
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    out = capfd.readouterr()
    return code, out.out, out.err


def fail(args: list[str], tmp_path: Path, monkeypatch, capfd) -> str:
    """Run the CLI in this process from tmp_path; check exit code 2, one error line, no traceback and an empty runs/
    (or none); return the message."""
    code, _, err = cli_main(args, tmp_path, monkeypatch, capfd)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("*")), list(runs.rglob("*"))
    return errors[0][len("error: "):]
