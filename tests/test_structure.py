"""The code's shape, checked: one name per task, imports flowing down the layers of pyproject.toml's import-linter
contracts (no cycle, no upward import), nothing heavy imported to read the task registry, small files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"


def test_imports_flow_down_the_layers_without_cycles(monkeypatch):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_every_module_of_the_package_is_in_a_layer():
    """A module the contract does not name could import from any layer: each one must be placed."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    placed = {name.strip() for layer in contract["layers"] for name in layer.split(":")}
    children = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | \
               {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert children == placed


def test_one_name_per_task():
    """task=<x>: configs/task/<x>.yaml names task <x> (a preset such as sentiment names the task it presets), whose
    class is finetune/tasks/<x>.py's and whose page is docs/tasks/<x>.md."""
    from finetune.tasks import registry

    tasks = registry()  # (and the task tests/test_add_a_task.py defines outside the package)
    for name, cls in tasks.items():
        if not cls.__module__.startswith("finetune."):
            continue
        assert cls.__module__ == f"finetune.tasks.{name}"
        assert (ROOT / "configs" / "task" / f"{name}.yaml").is_file()
        assert (ROOT / "docs" / "tasks" / f"{name}.md").is_file()
    for path in (ROOT / "configs" / "task").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert config["task"]["name"] in tasks, path
        assert f"/schema/task/{config['task']['name']}@task" in config["defaults"], path


def test_the_task_registry_imports_no_training_library():
    """The command line reads every task's schema before it checks a config: that must not cost the imports of
    torch, transformers or datasets (seconds)."""
    code = ("import sys; from finetune.tasks import registry; registry(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_source_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
           if (n := len(p.read_text().splitlines())) > 400}
    assert not big
