import pytest
from hydra.errors import ConfigCompositionException

from finetune.__main__ import rewrite_overrides
from finetune.errors import FinetuneError
from helpers.cli import compose_cfg


def test_default_is_offline_sentiment():
    cfg = compose_cfg()
    assert cfg.task.name == "classification"
    assert cfg.model.name_or_path == "bundled:minilm"
    assert cfg.data.source.startswith("bundled:rotten_tomatoes")
    assert cfg.data.group_column == "movie_name"
    assert list(cfg.data.label_names) == ["rotten", "fresh"]
    assert cfg.trainer.engine == "hf" and cfg.peft.method == "none"


def test_overrides_are_typed():
    cfg = compose_cfg("trainer.learning_rate=3e-5", "trainer.num_train_epochs=1", "data.max_train_samples=10")
    assert cfg.trainer.learning_rate == pytest.approx(3e-5)
    assert cfg.data.max_train_samples == 10
    with pytest.raises(ConfigCompositionException):
        compose_cfg("trainer.learning_rate=fast")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("trainer.lerning_rate=1e-4")  # typo: not in the schema


def test_hub_id_and_paths_become_generic_configs(tmp_path):
    cfg = compose_cfg("model=prajjwal1/bert-tiny", f"data={tmp_path}/reviews.csv", "data.text_column=review")
    assert cfg.model.name_or_path == "prajjwal1/bert-tiny"
    assert cfg.model.base_model is None  # the bundled model's card facts do not leak into a custom model
    assert cfg.data.source == f"{tmp_path}/reviews.csv"
    assert cfg.data.group_column is None and cfg.data.label_names is None
    assert cfg.data.text_column == "review"


def test_named_configs_are_kept():
    assert rewrite_overrides(["model=minilm", "data=rotten_tomatoes"]) == ["model=minilm", "data=rotten_tomatoes"]
    assert rewrite_overrides(["model=a,b"]) == ["model=a,b"]  # sweep syntax is Hydra's


def test_quotes_values_hydra_would_misparse():
    out = rewrite_overrides(["data=/tmp/my data,v2.csv"])
    assert out == ["data=/tmp/my data,v2.csv"]  # a comma means a sweep to Hydra: left to it
    out = rewrite_overrides(["model=bundled:minilm"])
    assert out == ["model=custom", "model.name_or_path='bundled:minilm'"]
    assert compose_cfg("model=bundled:minilm").model.name_or_path == "bundled:minilm"


def test_unknown_group_option_names_the_choices():
    with pytest.raises(FinetuneError, match=r"unknown task .sentimnt.: did you mean task=sentiment\? choose one of"):
        rewrite_overrides(["task=sentimnt"])
    with pytest.raises(FinetuneError, match="unknown trainer 'fast'"):
        rewrite_overrides(["trainer=fast"])


@pytest.mark.parametrize("task, own, foreign", [
    ("sentiment", {"task": {"name", "max_seq_length"}, "data": {"text_column", "text_pair_column", "label_names"}},
     ["task.doc_stride=64", "task.tag_scheme=IOB2", "data.question_column=q"]),
    ("ner", {"task": {"tag_scheme", "label_all_tokens"}, "data": {"text_column", "label_column", "label_names"}},
     ["task.doc_stride=64", "data.text_pair_column=x", "data.answers_column=a"]),
    ("qa", {"task": {"doc_stride", "n_best_size", "version_2_with_negative"},
            "data": {"question_column", "context_column", "answers_column"}},
     ["task.tag_scheme=IOB2", "data.text_column=t", "data.label_names=[a,b]"]),
])
def test_each_task_has_its_own_schema(task, own, foreign):
    cfg = compose_cfg(f"task={task}")
    for group, keys in own.items():
        assert keys <= set(cfg[group])
    others = {"doc_stride", "tag_scheme", "label_all_tokens", "n_best_size"} - own["task"]
    assert not others & set(cfg.task)  # a run's config.yaml shows its own task's keys only
    for override in foreign:
        with pytest.raises(ConfigCompositionException):
            compose_cfg(f"task={task}", override)
    assert compose_cfg(f"task={task}", f"data=/x/{task}.csv").data.source == f"/x/{task}.csv"  # schema kept for data=
