"""Metrics computed offline with the field's libraries (evaluate.load needs the Hub)."""

from __future__ import annotations

import math

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class precision / recall / F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
    }
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    for i, name in enumerate(labels):
        out.update({f"precision_{name}": float(p[i]), f"recall_{name}": float(r[i]), f"f1_{name}": float(f[i])})
    return out


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Micro-, macro- and samples-F1, exact match (a row's whole label set right) and per-label precision / recall / F1
    of multi-hot rows (scikit-learn). A label never true nor predicted scores 0, as in classification_metrics; in
    samples-F1 a row with no label that gets none is right."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true).astype(np.int8), np.asarray(y_pred).astype(np.int8)
    out = {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "f1_samples": float(f1_score(y_true, y_pred, average="samples", zero_division=1.0)),
        "exact_match": float(accuracy_score(y_true, y_pred)),
    }
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for i, name in enumerate(labels):
        out.update({f"precision_{name}": float(p[i]), f"recall_{name}": float(r[i]), f"f1_{name}": float(f[i])})
    return out


# a label with fewer validation positives than this takes the global threshold: the best cut of so few scores is
# chance, and a low one floods every text with a label the model has not learned
MIN_POSITIVES = 20


def tune_thresholds(y_true: np.ndarray, scores: np.ndarray, per_label: bool = True,
                    min_positives: int = MIN_POSITIVES) -> np.ndarray:
    """Decision thresholds (one a label) that maximise macro-F1 on (y_true, scores), [rows, labels] arrays.

    Global: one threshold for every label, the best of 0.01, 0.02, ..., 0.99 for the mean of the labels' F1.
    per_label: each label's F1-best cut of its sorted scores (maximising each label's F1 maximises their mean), set
    midway to the next lower score; a label with fewer than min_positives positive rows takes the global threshold;
    without any positive row at all, 0.5."""
    y_true, scores = np.asarray(y_true) > 0.5, np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    grid = np.round(np.linspace(0.01, 0.99, 99), 2)
    tp = np.stack([((scores >= t) & y_true).sum(0) for t in grid])
    predicted = np.stack([(scores >= t).sum(0) for t in grid])
    f1 = np.divide(2 * tp, predicted + y_true.sum(0), out=np.zeros(tp.shape), where=tp > 0)
    shared = grid[f1.mean(1).argmax()] if y_true.any() else 0.5
    if not per_label:
        return np.full(k, shared)
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked, hits = np.take_along_axis(scores, order, 0), np.take_along_axis(y_true, order, 0)
    f1 = 2 * np.cumsum(hits, 0) / (np.arange(1, n + 1)[:, None] + hits.sum(0))  # the top 1, 2, ... n rows predicted
    cut = np.vstack([ranked[:-1] > ranked[1:], np.ones((1, k), bool)])  # a cut never splits tied scores
    best = np.where(cut, f1, -1.0).argmax(0)
    columns = np.arange(k)
    below = np.where(best + 1 < n, ranked[np.minimum(best + 1, n - 1), columns], 0.0)
    own = (ranked[best, columns] + below) / 2
    positives = hits.sum(0)
    return np.where(positives >= max(min_positives, 1), own, np.where(positives > 0, shared, 0.5))


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy), mean squared and mean absolute error (scikit-learn). A correlation
    with constant predictions (undefined) is reported as 0: they carry no ranking."""
    import warnings

    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    with warnings.catch_warnings():  # scipy warns on constant input, which the 0 below covers
        warnings.simplefilter("ignore")
        pearson, spearman = float(pearsonr(y_true, y_pred)[0]), float(spearmanr(y_true, y_pred)[0])
    return {"pearson": 0.0 if math.isnan(pearson) else pearson, "spearman": 0.0 if math.isnan(spearman) else spearman,
            "mse": float(mean_squared_error(y_true, y_pred)), "mae": float(mean_absolute_error(y_true, y_pred))}


def entity_metrics(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, float]:
    """Entity-level precision / recall / F1 (micro over entities, as conlleval) overall and per entity type,
    and token accuracy (seqeval). Tags are IOB2; an I- after O or another type starts an entity, as in
    conlleval and in the token-classification pipeline's grouping."""
    import warnings

    from seqeval.metrics import accuracy_score, classification_report

    with warnings.catch_warnings():  # numpy warns on the macro average when there are no entities at all
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    out = {"precision": float(micro["precision"]), "recall": float(micro["recall"]), "f1": float(micro["f1-score"]),
           "accuracy": float(accuracy_score(y_true, y_pred))}
    for name, row in report.items():
        if not name.endswith(" avg"):
            out.update({f"precision_{name}": float(row["precision"]), f"recall_{name}": float(row["recall"]),
                        f"f1_{name}": float(row["f1-score"])})
    return out


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lowercase, no punctuation, no articles (a, an, the), single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _squad_f1(prediction: str, reference: str) -> float:
    from collections import Counter

    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # no-answer on either side: 1 when both are no-answer
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match and F1 as the official SQuAD v2.0 script computes them (v1.1 gives the same numbers on
    answerable questions), as fractions 0..1: the best over each question's reference answers; an empty
    reference list means "no answer", matched only by an empty prediction. With unanswerable questions,
    also has_ans_* and no_ans_*."""
    exact, f1, has_answer = [], [], []
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [r for r in refs if normalize_answer(r)] or [""]
        exact.append(max(float(normalize_answer(prediction) == normalize_answer(r)) for r in refs))
        f1.append(max(_squad_f1(prediction, r) for r in refs))
        has_answer.append(refs != [""])
    exact_a, f1_a, has = np.array(exact), np.array(f1), np.array(has_answer)
    out = {"exact_match": float(exact_a.mean()), "f1": float(f1_a.mean())}
    if not has.all():
        for name, mask in (("has_ans", has), ("no_ans", ~has)):
            if mask.any():
                out.update({f"{name}_exact_match": float(exact_a[mask].mean()), f"{name}_f1": float(f1_a[mask].mean())})
    return out


def generation_metrics(predictions: list[str], references: list[str | list[str]],
                       scores: tuple[str, ...] = ("rouge", "bleu")) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure with stemming (rouge-score), chrF and BLEU (sacrebleu), as fractions 0..1 except
    BLEU and chrF (0..100, as sacrebleu reports them), and the mean generated length in words. A reference may
    be a list of references: ROUGE takes the best one, sacrebleu uses all of them. `scores`: rouge, bleu or both."""
    import logging

    import sacrebleu
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." every time
    refs = [r if isinstance(r, list) else [r] for r in references]
    out = {}
    if "rouge" in scores:
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
        kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
        rouge = {k: [] for k in kinds}
        for prediction, options in zip(predictions, refs, strict=True):
            # rougeLsum splits summaries into sentences at newlines
            scored = [scorer.score("\n".join(r.split(". ")), "\n".join(prediction.split(". "))) for r in options]
            for k in kinds:
                rouge[k].append(max(s[k].fmeasure for s in scored))
        out.update({k: float(np.mean(v)) for k, v in rouge.items()})
    if "bleu" in scores:
        width = max(len(r) for r in refs)
        streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
        out["chrf"] = float(sacrebleu.corpus_chrf(predictions, streams).score)
        out["bleu"] = float(sacrebleu.corpus_bleu(predictions, streams).score)
    out["gen_len"] = float(np.mean([len(p.split()) for p in predictions]))
    return out


def masked_lm_metrics(labels: np.ndarray, top1: np.ndarray, nll: np.ndarray) -> dict[str, float]:
    """Over the masked tokens (label != -100): accuracy of the top-1 prediction, and perplexity = exp of the mean
    loss per masked token (token-weighted; the engines' eval loss averages per-batch means instead)."""
    masked = labels != -100
    n = int(masked.sum())
    if n == 0:
        return {"accuracy": 0.0, "perplexity": float("nan"), "masked_tokens": 0}
    return {"accuracy": float((top1[masked] == labels[masked]).mean()),
            "perplexity": float(np.exp(nll[masked].astype(np.float64).mean())), "masked_tokens": n}


def perplexity(sums: np.ndarray) -> dict[str, float]:
    """Perplexity, mean NLL and token count from per-example [summed NLL, tokens] rows (lm_loss.lm_sums)."""
    nll, tokens = float(sums[:, 0].sum()), float(sums[:, 1].sum())
    mean = nll / max(tokens, 1.0)
    return {"perplexity": math.exp(min(mean, 50.0)), "nll": mean, "num_tokens": int(tokens)}
