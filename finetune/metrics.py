"""Metrics computed offline with the field's libraries (evaluate.load needs the Hub)."""

from __future__ import annotations

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
