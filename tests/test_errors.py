"""Bad input as a new user types it, across all tasks: one line `error: ...`, exit code 2, nothing left in runs/.

Most cases call the CLI's entry point in this process (finetune.__main__.main with sys.argv set): the same
path as `python -m finetune ...` without paying for the imports each time. A few run as real processes:
two launches in the same second, Hydra's own reporting, a two-process launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune import __main__ as cli
from finetune import assets
from helpers.cli import fail
from helpers.data import make_sentences, write_sentiment_csv
from helpers.processes import ENV, accelerate_launch, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SENTIMENT = ["data.text_column=review", "data.label_column=sentiment"]
QUICK = ["trainer.num_train_epochs=1", "trainer.per_device_train_batch_size=16", "trainer.learning_rate=1e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good and bad data files for every task, in one directory."""
    d = tmp_path_factory.mktemp("inputs")
    rows = make_sentences(160)
    write_sentiment_csv(d / "reviews.csv", rows=rows)
    write_sentiment_csv(d / "one_class.csv", rows=[(t, "pos") for t, _ in rows])
    write_sentiment_csv(d / "int_labels.csv", rows=[(t, i % 3 - 1) for i, (t, _) in enumerate(rows)])
    (d / "header_only.csv").write_text("review,sentiment\n")
    (d / "broken.json").write_text('{"review": "good", "sentiment": ')
    (d / "broken.csv").write_text('review,sentiment\n"unclosed,pos\n')
    (d / "reviews.xlsx").write_bytes(b"PK\x03\x04")
    (d / "no_train").mkdir()
    (d / "no_train" / "test.csv").write_text((d / "reviews.csv").read_text())

    ner = [(["alice", "met", "bob", "in", "paris"], ["B-PER", "O", "B-PER", "O", "B-LOC"])] * 40
    conll = "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(*s)) for s in ner) + "\n"
    (d / "malformed.conll").write_text("alice B-PER\nmet O\n\nlonely\n")
    (d / "iob1.conll").write_text(conll.replace("paris B-LOC", "paris I-LOC"))
    (d / "all_o.conll").write_text(conll.replace("B-PER", "O").replace("B-LOC", "O"))
    (d / "int_tags.jsonl").write_text("".join(json.dumps({"tokens": w, "tags": [1, 0, 1, 0, 2]}) + "\n" for w, _ in ner))
    (d / "mismatch.jsonl").write_text("".join(json.dumps({"tokens": w, "tags": t[:-1]}) + "\n" for w, t in ner))

    context = "the film was made by alice in paris"
    qa = [{"question": "who made it?", "context": context, "answers": {"text": ["alice"], "answer_start": [21]}}] * 30
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    bad = [*qa, {"question": "where?", "context": context, "answers": {"text": ["rome"], "answer_start": [30]}}]
    (d / "qa_bad_answer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    v2 = [*qa, {"question": "when?", "context": context, "answers": {"text": [], "answer_start": []}}]
    (d / "qa_v2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v2))
    return d


# --- config values and keys: rejected before anything is written (no model, no data read) -----------
CONFIG_CASES = [
    (["trainer.num_train_epochs=-1"], "trainer.num_train_epochs must be above 0 (got -1.0)"),
    (["trainer.num_train_epochs=0"], "trainer.num_train_epochs must be above 0 (got 0.0)"),
    (["trainer.max_steps=0"], "trainer.max_steps must be a positive number of optimizer steps, or -1"),
    (["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size must be at least 1 (got 0)"),
    (["trainer.per_device_eval_batch_size=0"], "trainer.per_device_eval_batch_size must be at least 1 (got 0)"),
    (["trainer.gradient_accumulation_steps=0"], "trainer.gradient_accumulation_steps must be at least 1 (got 0)"),
    (["trainer.learning_rate=-1e-4"], "trainer.learning_rate must be at least 0 (got -0.0001)"),
    (["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio must be at least 0 and below 1 (got 1.5)"),
    (["trainer.logging_steps=0"], "trainer.logging_steps must be at least 1 (got 0)"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay must be at least 0 (got -0.1)"),
    (["trainer.lm_loss_chunk_size=-1"], "trainer.lm_loss_chunk_size must be a number of tokens, or 0 for the model's"),
    (["trainer.mixed_precision=fp8"], "trainer.mixed_precision must be auto, no, fp16 or bf16 (got 'fp8')"),
    (["trainer.engine=torch"], "unknown trainer.engine 'torch': choose one of accelerate, hf"),
    (["trainer.eval_strategy=steps"], "trainer.eval_strategy=steps needs trainer.eval_steps=<positive"),
    (["trainer.early_stopping_patience=2", "trainer.eval_strategy=no"],
     "trainer.early_stopping_patience counts evaluations"),
    (["trainer.learning_rate=fast"], "trainer.learning_rate must be a number (got 'fast')"),
    (["trainer.per_device_train_batch_size=1.5"], "trainer.per_device_train_batch_size must be an integer (got '1.5')"),
    (["trainer.eval_steps=often"], "trainer.eval_steps must be an integer or null (got 'often')"),
    (["debug=maybe"], "debug must be true or false (got 'maybe')"),
    (["trainer.report_to=tensorboard"], "trainer.report_to must be a list such as [a,b] (got 'tensorboard')"),
    (["trainer.lerning_rate=1e-4"], "unknown config key trainer.lerning_rate: did you mean trainer.learning_rate?"),
    (["trainr.learning_rate=1e-4"], "unknown config key trainr.learning_rate: did you mean trainer.learning_rate?"),
    (["task=ner", "task.tag_shceme=IOB2"], "unknown config key task.tag_shceme: did you mean task.tag_scheme?"),
    (["+trainer.warmup_steps=10"], "unknown config key trainer.warmup_steps: did you mean trainer.warmup_ratio?"),
    (["colour=red"], "unknown config key colour; `python -m finetune --cfg job` shows the keys"),
    (["trainer.learning_rate=${oops}"], "trainer.learning_rate: Interpolation key 'oops' not found"),
    (["trainer.learning_rate=[1"], "cannot parse the command line: "),
    (["model=custom"], "model.name_or_path is not set; pass model.name_or_path=<value>"),
    (["task=sentimnt"], "unknown task 'sentimnt': did you mean task=sentiment? choose one of"),
    (["trainer.new_parameters_lr_scale=0"], "trainer.new_parameters_lr_scale must be above 0 (got 0.0)"),
    (["trainer.label_smoothing=1"], "trainer.label_smoothing must be at least 0 and below 1 (got 1.0)"),
    (["trainer.label_smoothing=0.1"], "trainer.label_smoothing smooths language-model losses (tasks generation, mlm, "),
    # generation settings transformers refuses only once generate() runs, after training (every generating task)
    (["task=generation", "task.generation.do_sample=true", "task.generation.temperature=0"],
     "task.generation.temperature=0.0: `temperature` (=0.0) has to be a strictly positive float"),
    (["task=translation", "task.generation.temperature=0.7"],
     "task.generation.temperature=0.7: `do_sample` is not set to `True`. However, `temperature` is set to `0.7`"),
    (["task=summarization", "task.generation.do_sample=true", "task.generation.top_p=1.5"],
     "task.generation.top_p=1.5: `top_p` has to be a float > 0 and < 1, but is 1.5"),
    (["task=generation", "task.generation.repetition_penalty=0"],
     "task.generation.repetition_penalty=0.0: `penalty` has to be a strictly positive float, but is 0.0"),
    (["task=translation", "task.generation.max_new_tokens=0"],
     "task.generation.max_new_tokens=0: `max_new_tokens` must be greater than 0, but is 0"),
    (["task=summarization", "task.generation.num_beams=0"], "task.generation.num_beams=0: it must be at least 1"),
]


@pytest.mark.parametrize("args, message", CONFIG_CASES, ids=[" ".join(a) for a, _ in CONFIG_CASES])
def test_config_errors(args, message, tmp_path, monkeypatch, capfd):
    assert fail(args, tmp_path, monkeypatch, capfd).startswith(message)


def test_runs_dir_that_is_a_file(tmp_path, monkeypatch, capfd):
    (tmp_path / "results").write_text("not a directory")
    assert fail(["runs_dir=results"], tmp_path, monkeypatch, capfd) == \
        "runs_dir=results is a file, not a directory; pass runs_dir=<directory for the runs>"
    assert (tmp_path / "results").read_text() == "not a directory"


# --- model, data and task errors: the run starts, fails, and removes its directory -------------------
def job_cases(files: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    reviews = [f"model={model}", f"data={files / 'reviews.csv'}", *SENTIMENT]
    ner = ["task=ner", f"model={model}"]
    qa = ["task=qa", f"model={model}", "task.max_seq_length=64", "task.doc_stride=16"]
    return {
        "model-dir-missing": (["model=/nonexistent/dir"], "model directory not found: /nonexistent/dir; check the path"),
        "model-is-a-file": ([f"model={files / 'reviews.csv'}"], f"model={files / 'reviews.csv'} is a file; pass the "
                                                                 "checkpoint directory"),
        "max-seq-length-too-long": ([*reviews, "task.max_seq_length=100000"],
                                    f"task.max_seq_length=100000 is more than the 128 positions model '{model}' has; "
                                    "set task.max_seq_length=128 or less"),
        "max-seq-length-too-short": ([*reviews, "task.max_seq_length=2"], "task.max_seq_length=2 leaves no room for "
                                                                          "text: this tokenizer adds up to 3 special"),
        "scheduler-typo": ([*reviews, *QUICK, "trainer.lr_scheduler_type=cosin"],
                           "unknown trainer.lr_scheduler_type 'cosin': did you mean cosine? choose one of linear,"),
        "lora-rank-0": ([*reviews, "peft=lora", "peft.r=0"], "peft.r must be >= 1"),
        "data-missing": ([f"model={model}", "data=missing.csv", *SENTIMENT], "data file or directory not found: "
                                                                             "missing.csv; check the path"),
        "text-column": ([f"model={model}", f"data={files / 'reviews.csv'}", "data.text_column=body"],
                        "column 'body' (data.text_column) not found in the train data; available columns: review, "
                        "sentiment; set data.text_column=<one of them>"),
        "label-column": ([*reviews, "data.label_column=stars"], "column 'stars' (data.label_column) not found"),
        "pair-column": ([*reviews, "data.text_pair_column=title"], "column 'title' (data.text_pair_column) not found"),
        "group-column": ([*reviews, "data.group_column=movie"], "column 'movie' (data.group_column) not found"),
        "one-class": ([f"model={model}", f"data={files / 'one_class.csv'}", *SENTIMENT],
                      "the label column has one class in the training data ('pos')"),
        "label-names-match-nothing": ([*reviews, "data.label_names=[good,bad]"],
                                      "no rows have a label in data.label_names (good, bad); the labels are neg, "
                                      "pos: name those, or drop data.label_names"),
        "integer-labels": ([f"model={model}", f"data={files / 'int_labels.csv'}", *SENTIMENT],
                           "integer labels must be 0..K-1, found [-1, 0, 1]"),
        "no-rows": ([f"model={model}", f"data={files / 'header_only.csv'}", *SENTIMENT], "the train split is empty: "),
        "broken-json": ([f"model={model}", f"data={files / 'broken.json'}", *SENTIMENT],
                        f"cannot read {files / 'broken.json'} as json: JSON parse error: Invalid value."),
        "broken-csv": ([f"model={model}", f"data={files / 'broken.csv'}", *SENTIMENT],
                       f"cannot read {files / 'broken.csv'} as csv: Error tokenizing data. C error: EOF inside string"),
        "unknown-format": ([f"model={model}", f"data={files / 'reviews.xlsx'}", *SENTIMENT],
                           f"cannot read {files / 'reviews.xlsx'}: unknown format '.xlsx'; use csv, tsv, json, jsonl"),
        "no-train-file": ([f"model={model}", f"data={files / 'no_train'}", *SENTIMENT], "no train file in "),
        "validation-size": ([*reviews, "data.validation_size=1.5"], "data.validation_size must be above 0 and leave "),
        "no-train-samples": ([*reviews, "data.max_train_samples=0"], "the train split is empty; give it data"),
        "ner-malformed-conll": ([*ner, f"data={files / 'malformed.conll'}"],
                                f"{files / 'malformed.conll'}:4: expected a token and its tag"),
        "ner-scheme": ([*ner, f"data={files / 'iob1.conll'}", "task.tag_scheme=IOB2"],
                       "train sentence 1 (alice met bob in paris ...): 'I-LOC' at word 5 follows O, not B-LOC or I-LOC, "
                       "which IOB2 does not allow"),
        "ner-unknown-scheme": ([*ner, f"data={files / 'iob1.conll'}", "task.tag_scheme=IOE2"],
                               "unknown task.tag_scheme 'IOE2'"),
        "ner-no-entities": ([*ner, f"data={files / 'all_o.conll'}"], "the training data has no entities"),
        "ner-integer-tags": ([*ner, f"data={files / 'int_tags.jsonl'}"], "the tags are integers without names; "
                                                                          "set data.label_names="),
        "ner-tag-count": ([*ner, f"data={files / 'mismatch.jsonl'}"], "train sentence 1 has 5 tokens but 4 tags; give "
                                                                         "one tag per token"),
        "ner-no-data": (ner, "no data given: pass data=<file, directory or Hub dataset id>"),
        "qa-answer-not-in-context": ([*qa, f"data={files / 'qa_bad_answer.jsonl'}"],
                                     "train row 30: answer 'rome' does not occur in its context"),
        "qa-unanswerable-without-v2": ([*qa, f"data={files / 'qa_v2.jsonl'}"],
                                       "1 train questions have no answer (SQuAD v2 style); set "
                                       "task.version_2_with_negative=true"),
        "qa-doc-stride": ([*qa, f"data={files / 'qa.jsonl'}", "task.doc_stride=40"],
                          "task.doc_stride=40 must be between 0 and half of task.max_seq_length=64"),
        "qa-context-column": ([*qa, f"data={files / 'qa.jsonl'}", "data.context_column=passage"],
                              "column 'passage' (data.context_column) not found"),
        "card-dataset-name": ([*reviews, "data.dataset_name='my reviews (v2)'"],
                              "data.dataset_name='my reviews (v2)' is not a Hub id, which the model card needs"),
        "resume-not-a-run": ([*reviews, f"resume={files}"], f"resume={files}: not a run directory"),
        "resume-nothing": ([*reviews, "resume=true"], "nothing to resume: no unfinished run of this config"),
    }


JOB_CASES = list(job_cases(Path("/f"), Path("/m")))


@pytest.mark.parametrize("case", JOB_CASES)
def test_input_errors(case, files, tiny_bert, tmp_path, monkeypatch, capfd):
    args, message = job_cases(files, tiny_bert)[case]
    assert fail(args, tmp_path, monkeypatch, capfd).startswith(message)


def test_unknown_hub_names_fail_fast_offline(files, tiny_bert, tmp_path, monkeypatch, capfd):
    assets.hub_unreachable.cache_clear()
    start = time.perf_counter()
    message = fail(["model=bert-bse-uncased"], tmp_path, monkeypatch, capfd)
    # checked before the libraries load (a process would take ~1 s); the Hub libraries' retries took about a minute
    assert time.perf_counter() - start < assets.HUB_PROBE_TIMEOUT_S + 2
    assert message.startswith("model 'bert-bse-uncased' is not a local directory and the Hub (https://huggingface.co) "
                              "is unreachable (") and "nor is it in the Hub cache" in message
    start = time.perf_counter()
    message = fail([f"model={tiny_bert}", "data=imdbb", "data.text_column=text"], tmp_path, monkeypatch, capfd)
    assert time.perf_counter() - start < assets.HUB_PROBE_TIMEOUT_S + 2
    assert message.startswith("data 'imdbb' is not a local file or directory and the Hub (https://huggingface.co) is "
                              "unreachable (")


def test_hub_names_a_cache_holds_pass_the_early_check(tmp_path, monkeypatch):
    """Offline, the CLI refuses a Hub name before its imports only when no cache can hold it."""
    import datasets
    from huggingface_hub import constants

    from finetune import compose, sources
    from finetune.compose import register_configs
    from finetune.errors import FinetuneError

    register_configs()
    assets.hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    model, data = ["model=someone/some-model"], ["data=someone/Some-Data", "task=sentiment"]
    for args, what in ((model, "the Hub cache"), (data, "the datasets cache")):
        with pytest.raises(FinetuneError, match=f"nor is it in {what}"):
            sources.check(compose.compose(cli.rewrite_overrides(args)))
    repo, commit = tmp_path / "hub" / "models--someone--some-model", "0" * 40  # huggingface_hub's cache layout
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (tmp_path / "datasets" / "someone___some_data").mkdir(parents=True)  # datasets' own layout of a cached dataset
    for args in (model, data):
        sources.check(compose.compose(cli.rewrite_overrides(args)))
    assets.hub_unreachable.cache_clear()


def test_hub_offline_mode_is_honoured(tmp_path, monkeypatch, capfd):
    from huggingface_hub import constants

    assets.hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = fail(["model=someone/some-model"], tmp_path, monkeypatch, capfd)
    assets.hub_unreachable.cache_clear()
    assert "the Hub (https://huggingface.co) is unreachable (HF_HUB_OFFLINE is set)" in message


@pytest.mark.slow
def test_hub_probe_gives_up_within_its_timeout(monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assets.hub_unreachable.cache_clear()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        reason = assets.hub_unreachable()
        assets.hub_unreachable.cache_clear()
    assert reason and time.perf_counter() - start < assets.HUB_PROBE_TIMEOUT_S + 2


def test_resume_of_a_finished_run(files, tiny_bert, tmp_path, monkeypatch, capfd):
    run = tmp_path / "old"
    (run / "model").mkdir(parents=True)
    (run / "config.hash").write_text("0" * 16)
    message = fail([f"model={tiny_bert}", f"data={files / 'reviews.csv'}", *SENTIMENT, f"resume={run}"],
                   tmp_path, monkeypatch, capfd)
    assert message == f"resume={run}: that run already finished (it has model/); nothing to resume"
    assert (run / "config.hash").is_file()  # a refused resume deletes nothing


def test_other_processes_of_a_launch_name_their_rank(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "_GRACE_S", 0.0)
    assert fail(["trainer.num_train_epochs=-1"], tmp_path, monkeypatch, capfd).endswith("(rank 1)")


def test_debug_shows_the_traceback_of_a_config_error(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["finetune", "trainer.num_train_epochs=-1", "debug=true"])
    with pytest.raises(SystemExit):
        cli.main()
    err = capfd.readouterr().err
    assert "Traceback" in err and "error: trainer.num_train_epochs must be above 0" in err


# --- run directories ---------------------------------------------------------------------------------
def test_run_dir_taken_gets_a_suffix(tmp_path, monkeypatch):
    from finetune.compose import compose

    monkeypatch.chdir(tmp_path)
    cfg = compose(["hydra.run.dir=runs/sentiment/t"])
    made = [cli._create_run_dir(cfg) for _ in range(3)]
    assert [p.name for p in made] == ["t", "t_2", "t_3"] and all(p.is_dir() for p in made)


_START_TOGETHER = """
import sys, time
from datetime import datetime
from pathlib import Path
import hydra.core.utils
from finetune.__main__ import main
Path(sys.argv.pop(1)).touch()             # imported: ready
while not Path("go").exists():
    time.sleep(0.01)
start = float(Path("go").read_text())
time.sleep(max(0.0, start - time.time()))

class Started(datetime):  # ${now:} is the second both started in, however long each takes to compose its config
    @classmethod
    def now(cls, tz=None):
        return datetime.fromtimestamp(start, tz)

hydra.core.utils.datetime = Started
main()
"""


@pytest.mark.slow
def test_two_launches_in_the_same_second_get_two_run_dirs(tiny_bert, files, tmp_path):
    args = [f"model={tiny_bert}", f"data={files / 'reviews.csv'}", *SENTIMENT, *QUICK, "data.max_train_samples=32"]
    env = {**os.environ, **ENV}
    procs = [subprocess.Popen([sys.executable, "-c", _START_TOGETHER, f"ready{seed}", *args, f"seed={seed}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    deadline = time.time() + 120
    while not ((tmp_path / "ready1").exists() and (tmp_path / "ready2").exists()):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go = int(time.time()) + 1.05
    (tmp_path / "go").write_text(str(go))  # both start 50 ms into the same second
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    runs = sorted((tmp_path / "runs" / "sentiment").iterdir())
    assert len(runs) == 2, runs
    assert runs[0].name == time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(go))  # the second they started in
    assert runs[1].name == f"{runs[0].name}_2"  # the same second: the second launch took <time>_2
    seeds = set()
    for run in runs:
        assert (run / "model" / "model.safetensors").is_file() and (run / "metrics.json").is_file()
        seeds.add(next(line for line in (run / "config.yaml").read_text().splitlines() if line.startswith("seed:")))
        assert f"-> {run.resolve()}/model" in (run / "finetune.log").read_text()
    assert seeds == {"seed: 1", "seed: 2"}  # each directory holds its own run


# --- real processes: Hydra's reporting and a two-process launch ----------------------------------------
def test_hydra_errors_are_one_line_in_a_real_process(tmp_path):
    for args in (["trainer.lerning_rate=1e-4"], ["--multirun", "trainer.lerning_rate=1e-4", "seed=1,2"]):
        proc = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2
        assert proc.stderr.strip() == "error: unknown config key trainer.lerning_rate: did you mean " \
                                      "trainer.learning_rate?", proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_process_launch_reports_a_config_error_once(tmp_path):
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2"], "trainer.per_device_train_batch_size=0",
                             cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: trainer.per_device_train_batch_size must be at least 1 (got 0)"], proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
