"""Qualitative examples (paper Table 2): the most helpful and most harmful left-out instances for
a test point by the gold standard and by each method, with their original rows."""
from __future__ import annotations

import numpy as np


def influential_examples(ds, gold: dict, a: np.ndarray, scores: dict, j: int, t: int = 0,
                         k: int = 1):
    """The k most helpful (most positive) and most harmful (most negative) left-out instances for
    test point j by the gold scores at eval point t (0 = first after theta^f) and by each method,
    with their original rows (paper Table 2)."""
    import pandas as pd
    loo = np.asarray(gold["loo_indices"])
    rows = []

    def add(source, vec):
        order = np.argsort(vec)
        for kind, picks in (("most helpful", order[::-1][:k]), ("most harmful", order[:k])):
            for i in picks:
                row = {"by": source, "kind": kind, "train index": int(loo[i]),
                       "score": float(vec[i])}
                if ds.raw_train is not None:
                    row.update(ds.raw_train.iloc[int(loo[i])].to_dict())
                else:
                    row["target"] = ds.y_train[int(loo[i])]
                rows.append(row)

    add("gold (eq. 13)", a[:, t, j])
    for m, s in scores.items():
        add(m, s[j])
    test_row = {"by": "TEST INSTANCE", "kind": "", "train index": -1, "score": np.nan}
    if ds.raw_test is not None:
        test_row.update(ds.raw_test.iloc[int(gold["test_indices"][j])].to_dict())
    return pd.DataFrame([test_row] + rows)
