"""python -m finetune.pairs on tiny models: pairs judged by a classifier, and a judged sample with its KL divergence."""

from __future__ import annotations

import json

import pytest

from helpers.data import LM_WORDS as WORDS
from helpers.models import build_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert):
    """A tiny LM, and a tiny random text classifier (rotten / fresh) as the judge."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    root = tmp_path_factory.mktemp("pairs")
    torch.manual_seed(0)
    judge = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, id2label={0: "rotten", 1: "fresh"},
                                                          label2id={"rotten": 0, "fresh": 1})
    judge.save_pretrained(root / "judge")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(root / "judge")
    rows = [{"text": " ".join(WORDS[(i * 7 + j) % 20] for j in range(8)), "category": "fresh" if i % 3 else "plot"}
            for i in range(60)]
    (root / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_tiny_lm(root / "lm", max_length=256), root


def run(args: list[str]):
    from finetune.pairs import main

    main(args)


def test_make_writes_the_best_and_worst_judged_answers_as_pairs(models, caplog):
    lm, root = models
    out = root / "pairs.jsonl"
    caplog.set_level("INFO", logger="finetune")
    run(["make", str(lm), "--judge", str(root / "judge"), "--prompts", str(root / "reviews.jsonl"),
         "--keep", "category=fresh", "--words", "3", "--limit", "10", "--samples", "3", "--max-new-tokens", "5",
         "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts = {json.loads(line)["text"] for line in (root / "reviews.jsonl").read_text().splitlines()
             if json.loads(line)["category"] == "fresh"}
    assert 0 < len(rows) <= 10
    for row in rows:
        assert len(row["prompt"].split()) == 3 and any(t.startswith(row["prompt"]) for t in texts)
        assert row["chosen"] != row["rejected"] and row["chosen_score"] > row["rejected_score"]
    assert f"{len(rows)} pairs from 10 prompts (3 answers each)" in caplog.text


def test_judge_reports_the_positive_rate_and_no_kl_from_itself(models):
    lm, root = models
    out = root / "judged.json"
    run(["judge", str(lm), "--judge", str(root / "judge"), "--prompts", str(root / "reviews.jsonl"), "--skip", "10",
         "--limit", "6", "--samples", "2", "--max-new-tokens", "4", "--reference", str(lm), "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["samples"] == 12 and 0 <= result["positive_rate"] <= 1
    assert abs(result["kl"]) < 1e-5  # the same model: every answer's log-probs equal
    assert len(result["examples"]) == 5


def test_a_label_the_judge_lacks_is_one_line(models, capfd):
    lm, root = models
    with pytest.raises(SystemExit) as exit_:
        run(["judge", str(lm), "--judge", str(root / "judge"), "--prompts", str(root / "reviews.jsonl"),
             "--limit", "2", "--max-new-tokens", "2", "--label", "positive", "--output", str(root / "x.json")])
    assert exit_.value.code == 2
    assert "error: --label positive is not one of the judge's labels (rotten, fresh)" in capfd.readouterr().err
    assert not (root / "x.json").exists()
