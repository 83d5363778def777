"""Documented commands cannot drift: every `python -m finetune ...` command line in README.md and docs/ is checked
in-process, without running it.

- `python -m finetune ...` (also under `accelerate launch` / `torchrun`, and sweeps with `-m`): its overrides are
  rewritten and composed as the CLI does (finetune.__main__.rewrite_overrides, finetune.compose.compose,
  finetune.validate's trainer and model checks): no unknown key, no wrong type, no unknown group option, no value out of
  range. A sweep is composed once per value of each swept key. Path existence (finetune.sources.check) is the one
  check left out: the docs name files the reader has.
- Placeholders: `<...>` inside a value and a value `...` become a value of the key's schema type; a bare `...`
  argument stands for arguments left out and is dropped (the rest is still checked).
- A documented console example (`$ python -m finetune ...` followed by `error: ...`) whose config is bad must fail
  with exactly that line.
- Subcommands (finetune.predict / evaluate / push / leaderboard / bench / assets / pairs) are parsed by their own argparse
  parser (built by their main(), stopped right after parsing); finetune.evaluate's data overrides compose too.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from finetune import compose, validate
from finetune.__main__ import rewrite_overrides
from finetune.compose import register_configs
from finetune.errors import FinetuneError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"<[^<>]+>")
# Hydra's own flags: how many arguments each takes
HYDRA_FLAGS = {"-m": 0, "--multirun": 0, "--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--resolve": 0, "--help": 0,
               "-h": 0, "--hydra-help": 0, "--info": 0, "-i": 0}
SUBCOMMANDS = ("predict", "evaluate", "push", "leaderboard", "bench", "assets", "pairs")


@dataclass
class Command:
    where: str  # file:line
    module: str  # finetune, finetune.predict, ...
    args: list[str]
    expected_error: str | None = None  # a documented `error: ...` line after a `$ ` console command

    def __str__(self):
        return f"{self.where}: python -m {self.module} {shlex.join(self.args)}"


# ---------------------------------------------------------------------------------------------------- extraction
def extract(text: str, name: str) -> list[Command]:
    """The finetune command lines of a markdown text: in shell code blocks (continuation lines joined, comments
    dropped, `$ ` prompts), and in inline code."""
    commands, prose, fence, block = [], [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, block = stripped[3:].strip().lower(), []
            else:
                if fence in SHELL_FENCES:
                    commands += _from_block(block, name)
                fence = None
            prose.append((number, ""))
        elif fence is None:
            prose.append((number, line))
        else:
            block.append((number, line))
    # inline code may wrap over two lines of a paragraph
    flat, starts = "", []
    for number, line in prose:
        starts.append((len(flat), number))
        flat += line + "\n"
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", flat):
        code = match.group(1).replace("\n", " ")
        number = max(n for offset, n in starts if offset <= match.start())
        commands += _commands_in(code, f"{name}:{number}")
    return commands


def _from_block(block: list[tuple[int, str]], name: str) -> list[Command]:
    out, pending, first = [], "", None
    for i, (number, line) in enumerate(block):
        first = first or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        expected = None
        if logical.lstrip().startswith("$ "):
            logical = logical.lstrip()[2:]
            following = block[i + 1][1].strip() if i + 1 < len(block) else ""
            expected = following[len("error: "):] if following.startswith("error: ") else None
        for command in _commands_in(logical, f"{name}:{first}"):
            command.expected_error = expected
            out.append(command)
        first = None
    return out


def _commands_in(line: str, where: str) -> list[Command]:
    """`python -m finetune[.sub] args` (after `&&` too), or `accelerate launch ... -m finetune args`."""
    line = PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), line)  # `<run dir>` is one argument
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    segments, current = [], []
    for token in tokens:
        if token in ("&&", ";", "||", "|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    out = []
    for seg in segments:
        if len(seg) < 3 or seg[0] not in ("python", "python3", "accelerate", "torchrun"):
            continue
        at = 1 if seg[0].startswith("python") else next((i for i, t in enumerate(seg) if t == "-m"), None)
        if at is not None and seg[at] == "-m" and at + 1 < len(seg) and re.fullmatch(r"finetune(\.\w+)?", seg[at + 1]):
            out.append(Command(where, seg[at + 1], seg[at + 2:]))
    return out


# ------------------------------------------------------------------------------------------------------ checking
def check(command: Command) -> str | None:
    """None when the command line is valid, else why not (one line)."""
    if command.module == "finetune":
        return _check_main(command)
    sub = command.module.removeprefix("finetune.")
    if sub not in SUBCOMMANDS:
        return f"unknown program python -m {command.module}"
    if not command.args:  # the program named in prose ("... with `python -m finetune.predict`"): it exists
        return None
    return _check_subcommand(sub, command.args)


def _check_main(command: Command) -> str | None:
    args, multirun, i = [], False, 0
    while i < len(command.args):
        arg = command.args[i]
        if arg.startswith("-"):
            if arg not in HYDRA_FLAGS:
                return f"unknown flag {arg}"
            multirun |= arg in ("-m", "--multirun")
            i += 1 + HYDRA_FLAGS[arg]
            continue
        if arg != "...":  # "and more arguments": the rest is checked
            args.append(arg)
        i += 1
    try:
        variants = _sweep_variants(args) if multirun else [args]
        for overrides in variants:
            _compose_checked(_fill_placeholders(overrides))
    except FinetuneError as e:
        error = str(e)
        if command.expected_error is not None:
            return None if error == command.expected_error else f"fails with '{error}', documented: " \
                                                                 f"'{command.expected_error}'"
        return error
    # a documented error the config passes comes later (from the data, the Hub, ...): not checked here
    return None


def _compose_checked(overrides: list[str]):
    return _composed(tuple(_without_missing_launcher(overrides)))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    register_configs()
    cfg = compose.compose(rewrite_overrides(list(overrides)))
    validate.trainer(cfg.trainer)
    validate.model(cfg)
    return cfg


def _without_missing_launcher(overrides: list[str]) -> list[str]:
    """`hydra/launcher=slurm` / `ray_cluster` need an optional extra (finetune[slurm], finetune[ray]) whose Hydra
    plugin brings the launcher's base config: without it installed, the option's file must exist, and the rest of
    the command (all but that launcher's own hydra.launcher.* keys) is still composed."""
    launcher = next((o.partition("=")[2] for o in overrides if o.startswith("hydra/launcher=")), None)
    if launcher is None:
        return overrides
    config = ROOT / "configs" / "hydra" / "launcher" / f"{launcher}.yaml"
    base = re.search(r"^\s*-\s*(\w+)\s*$", config.read_text(), re.M) if config.is_file() else None
    plugin = {"submitit_slurm": "hydra_plugins.hydra_submitit_launcher", "ray": "hydra_plugins.hydra_ray_launcher"}
    if base is None or base.group(1) not in plugin or importlib.util.find_spec(plugin[base.group(1)]) is not None:
        return overrides  # a launcher Hydra has (joblib), or whose plugin is installed: composed as it is
    return [o for o in overrides if not o.startswith(("hydra/launcher=", "hydra.launcher."))]


def _fill_placeholders(overrides: list[str]) -> list[str]:
    """`<...>` in a value, or a value `...`, becomes a value of the key's schema type."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not (PLACEHOLDER.search(value) or value == "..."):
            out.append(override)
            continue
        whole = value == "..." or PLACEHOLDER.fullmatch(value)
        typed = "placeholder"
        if whole and "." in key:
            node = _schema_node([o for o in overrides if o != override], key)
            typed = next((v for cls, v in ((BooleanNode, "true"), (IntegerNode, "1"), (FloatNode, "0.1"))
                          if isinstance(node, cls)), "placeholder")
        out.append(f"{key}={typed}" if whole else f"{key}={PLACEHOLDER.sub('placeholder', value)}")
    return out


def _schema_node(other_overrides: list[str], key: str):
    cfg = _compose_checked(_fill_placeholders(other_overrides))
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key)
    return parent._get_node(name) if parent is not None and name in parent else None


def _sweep_variants(args: list[str]) -> list[list[str]]:
    """Every swept value at least once: variant i takes the i-th value of each sweep (its last when it has fewer)."""
    filled = _fill_placeholders(args)
    parsed = OverridesParser.create().parse_overrides(filled)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [None] for o in parsed]
    return [[a if v[0] is None else f"{a.partition('=')[0]}={v[min(i, len(v) - 1)]}" for a, v in zip(filled, values)]
            for i in range(max(map(len, values)))]


class _Parsed(Exception):
    pass


def _check_subcommand(sub: str, args: list[str]) -> str | None:
    """Parse the arguments with the program's own parser (its main() builds it; it is stopped after parsing)."""
    module = importlib.import_module(f"finetune.{sub}")
    fragment = "..." in args  # "and more arguments": only the flags given are checked
    task = _task_option(next((a for a in args if not a.startswith("-")), ""))
    args = [PLACEHOLDER.sub("placeholder", a) for a in args if a != "..."]

    def stop(parser, *a, **k):
        raise _Parsed(parser)

    patches = [mock.patch.object(argparse.ArgumentParser, name, stop) for name in ("parse_args", "parse_intermixed_args")]
    patches.append(mock.patch("logging.basicConfig"))  # predict sets up logging before it parses
    if sub == "predict":  # its flags for input columns come from the model's task: the one the command names
        patches.append(mock.patch.object(module, "_task_of", lambda model: _task_for(task, model)))
    for p in patches:
        p.start()
    try:
        module.main(list(args))
        return f"python -m finetune.{sub}: its main() did not parse its arguments"
    except _Parsed as stopped:
        parser = stopped.args[0]
    finally:
        for p in patches:
            p.stop()
    try:
        if fragment:
            unknown = [a.partition("=")[0] for a in args
                       if a.startswith("-") and a.partition("=")[0] not in parser._option_string_actions]
            if unknown:
                return f"python -m finetune.{sub}: unknown option {unknown[0]}"
            return None
        parsed = (parser.parse_intermixed_args if sub == "evaluate" else parser.parse_args)(args)
    except SystemExit:
        return f"python -m finetune.{sub} refuses: {shlex.join(args)}"
    if sub == "evaluate":
        return _check_evaluate_overrides(task, parsed)
    return None


def _task_option(model: str) -> str:
    """The task of a documented model: `<ner model dir>`, runs/<task>/..., else the default (sentiment)."""
    named = re.search(r"<([a-z0-9]+)[ _]model[ _]dir>|runs/(\w+)/", model)
    return next((g for g in (named.groups() if named else ()) if g), "sentiment")


def _task_for(option: str, model: str | None):
    from finetune.tasks import get_task

    cfg = _compose_checked([f"task={option}"])
    task = get_task(cfg.task)
    return task, Path(model or "."), {f: cfg.data[f] for f in task.recorded_columns() if f in cfg.data}


def _check_evaluate_overrides(option: str, parsed) -> str | None:
    from finetune.evaluate import compose as evaluate_compose

    cfg = _compose_checked([f"task={option}"])
    record = {"task": OmegaConf.to_container(cfg.task, resolve=True), "data": {}}
    try:
        evaluate_compose(record, _fill_placeholders(parsed.overrides))
    except FinetuneError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException) as e:
        return compose.config_error(e, parsed.overrides)
    return None


# --------------------------------------------------------------------------------------------------------- tests
DOCUMENTED = [c for path in DOC_FILES for c in extract(path.read_text(), str(path.relative_to(ROOT)))]


def test_commands_are_found_on_every_page_that_shows_one():
    assert len(DOCUMENTED) > 80
    pages = {c.where.split(":")[0] for c in DOCUMENTED}
    for path in DOC_FILES:
        if re.search(r"python3? -m finetune", path.read_text()):
            assert str(path.relative_to(ROOT)) in pages, path


@pytest.mark.parametrize("command", DOCUMENTED, ids=lambda c: c.where)
def test_documented_command_composes(command):
    assert check(command) is None, f"{command}\n  -> {check(command)}"


def _only(markdown: str) -> Command:
    commands = extract(markdown, "t.md")
    assert len(commands) == 1, commands
    return commands[0]


def test_extraction_joins_lines_drops_comments_and_reads_inline_code():
    text = ("Some `python -m finetune task=qa\ndata=x.json` prose.\n\n```bash\n"
            "python -m finetune -m task=ner \\\n    trainer.learning_rate=1e-4,3e-4   # a grid\n"
            "pip install x && python -m finetune.push <run dir> --repo-id me/m\n"
            "accelerate launch --multi_gpu -m finetune task=sentiment trainer=accelerate\n```\n"
            "```python\npython -m finetune task=ignored\n```\n")
    commands = extract(text, "t.md")
    assert [(c.module, c.args) for c in commands] == [
        ("finetune", ["-m", "task=ner", "trainer.learning_rate=1e-4,3e-4"]),
        ("finetune.push", ["<run_dir>", "--repo-id", "me/m"]),
        ("finetune", ["task=sentiment", "trainer=accelerate"]),
        ("finetune", ["task=qa", "data=x.json"]),
    ]


@pytest.mark.parametrize("markdown, error", [
    ("`python -m finetune trainer.learnin_rate=1`", "did you mean trainer.learning_rate"),
    ("`python -m finetune task=sentimnt`", "unknown task 'sentimnt'"),
    ("`python -m finetune trainer.learning_rate=fast`", "must be a number"),
    ("`python -m finetune task=qa task.tag_scheme=IOB2`", "unknown config key task.tag_scheme"),
    ("`python -m finetune trainer.warmup_ratio=1.5`", "warmup_ratio must be at least 0 and below 1"),
    ("`python -m finetune -m trainer.learning_rate=1e-4,fast`", "must be a number"),   # the second swept value
    ("`python -m finetune --cgf job`", "unknown flag --cgf"),
    ("`python -m finetune.push <run dir> --repo-idd me/m`", "refuses"),
    ("`python -m finetune.predict <qa model dir> q.csv --questions-column q`", "refuses"),
    ("`python -m finetune.evaluate <model dir> data=x.csv data.text_colum=body`", "data.text_colum"),
    ("`python -m finetune.bench --rows defualt`", "refuses"),
    ("`python -m finetune.train task=sentiment`", "unknown program"),
    ("```\n$ python -m finetune trainer.lerning_rate=3e-5\nerror: unknown config key, said the docs\n```",
     "documented: 'unknown config key, said the docs'"),
])
def test_checker_catches_bad_commands(markdown, error):
    problem = check(_only(markdown))
    assert problem is not None and error in problem, problem


def test_placeholders_take_the_schema_type():
    assert check(_only("`python -m finetune data=<hub dataset id> data.max_train_samples=<n>`")) is None
    assert _fill_placeholders(["data.max_train_samples=<n>", "resume=<run dir>"]) == \
        ["data.max_train_samples=1", "resume=placeholder"]
    assert check(_only("`python -m finetune.predict <qa model dir> q.parquet --question-column q`")) is None


README_LINK = re.compile(r"\]\((docs/[^)#\s]+\.md)(?:#([\w-]+))?\)")


def test_readme_links_reach_pages_and_anchors():
    readme = (ROOT / "README.md").read_text()
    links = README_LINK.findall(readme)
    assert links
    for page, anchor in links:
        target = ROOT / page
        assert target.is_file(), page
        if anchor:
            assert f"{{#{anchor}}}" in target.read_text(), f"{page}#{anchor}"
