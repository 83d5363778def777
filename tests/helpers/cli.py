"""The CLI in this process: compose the real config tree the way it does, call its entry point with argv (or another
module's main), or build what run.py builds before it trains (a task's engine on a tiny model). Real processes are
in processes.py."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from finetune.__main__ import rewrite_overrides
from finetune.compose import register_configs
from finetune.config import CONFIG_DIR

# Fast trainer settings for runs on the tiny BERT.
TINY_TRAINER = ["trainer.num_train_epochs=2", "trainer.learning_rate=1e-3", "trainer.per_device_train_batch_size=16",
                "trainer.logging_steps=5", "trainer.warmup_ratio=0.0"]
# task=generation on the tiny Llama (helpers.models.build_tiny_lm) and helpers.data.lm_corpus: it learns the data
LM_TRAINER = ["trainer.num_train_epochs=2", "trainer.learning_rate=3e-3", "trainer.per_device_train_batch_size=8",
              "trainer.gradient_accumulation_steps=1", "trainer.logging_steps=5", "trainer.warmup_ratio=0.0",
              "task.block_size=32", "task.eval_prompts=4", "task.generation.max_new_tokens=8"]


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
    with _streams_put_back():
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    out = capfd.readouterr()
    return code, out.out, out.err


def run_main(module, argv: list[str]) -> int:
    """module.main(argv) (finetune.predict, finetune.evaluate, ...) in this process; returns its exit code."""
    with _streams_put_back(), pytest.raises(SystemExit) as exit_info:
        module.main(argv)
        raise SystemExit(0)
    return exit_info.value.code


@contextmanager
def _streams_put_back():
    """A CLI in this process re-points sys.stderr and adds logging handlers bound to the streams of the moment
    (Hydra's job logging, predict's and evaluate's basicConfig): put them back while this test's captured streams are
    open (monkeypatch's undo can run after capfd has closed them, and every later test would write to a closed file)."""
    stderr = sys.stderr
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:  # a run's console and log-file handlers must not outlive the captured streams
        sys.stderr = stderr
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level


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


def prepared(*overrides: str):
    """What run.py builds before its engine from `python -m finetune <overrides>`: (cfg, task, tokenizer, features,
    model), the seed set and the model wrapped as cfg.peft says."""
    import transformers

    from finetune import adapters, data
    from finetune.tasks import get_task

    cfg = compose_cfg(*overrides)
    transformers.set_seed(cfg.seed)
    task, path = get_task(cfg.task), cfg.model.name_or_path
    tokenizer = task.load_tokenizer(path, cfg.model)
    features = task.tokenize(data.load(cfg.data, task), tokenizer)
    return cfg, task, tokenizer, features, adapters.wrap(task.load_model(path, cfg.model), cfg.peft, task)


def engine_for(output_dir: Path, *overrides: str):
    """The engine run.py would train, writing to output_dir."""
    from finetune.engines import make_engine

    cfg, task, tokenizer, features, model = prepared(*overrides)
    return make_engine(cfg, task, model, tokenizer, features, output_dir)
