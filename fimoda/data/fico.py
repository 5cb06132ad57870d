"""FICO HELOC, the paper's FICO data set (binary classification, tabular).

The CSV loses the rows whose features are all missing, its special values are recoded with
training statistics as in the paper's reference preprocessing, then it is split 90/10
(``random_state=0``) and standardized on the training split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .files import DataFileError
from .tabular import split_rows, standardize


FICO_LABEL = "RiskPerformance"


def _fico_features(raw: pd.DataFrame, train_rows: np.ndarray) -> pd.DataFrame:
    """Special values of the FICO HELOC data, as in the reference preprocessing of the paper
    (Wei et al. 2021, ``load_and_process_FICO``), with every statistic from the training split:

    - MSinceMostRecentDelq: -7 (>= 84 months) -> max + 1; -8 (no data) -> mean of values >= 0;
    - MSinceMostRecentInqexcl7days: -7 (inquiry in the last 7 days) -> 0; -8 (> 24 months)
      -> max + 1;
    - MaxDelq2PublicRecLast12M > 7 ("other") -> 7;
    - remaining -8, then remaining -9 -> per-column mean of values >= 0 (each mean computed
      after the previous replacement, in that order)."""
    x = raw.astype(np.float64).copy()
    tr = x.index[train_rows]
    c = "MSinceMostRecentDelq"
    mean_delq = x.loc[tr, c][x.loc[tr, c] >= 0].mean()
    max_delq = x.loc[tr, c].max()
    x.loc[x[c] == -7, c] = max_delq + 1
    x.loc[x[c] == -8, c] = mean_delq
    c = "MSinceMostRecentInqexcl7days"
    x.loc[x[c] == -7, c] = 0
    x.loc[x[c] == -8, c] = x.loc[tr, c].max() + 1
    c = "MaxDelq2PublicRecLast12M"
    x.loc[x[c] > 7, c] = 7
    for special in (-8, -9):
        t = x.loc[tr]
        means = t[t >= 0].mean()
        for col in x.columns:
            x.loc[x[col] == special, col] = means[col]
    return x


def build_fico(paths, root, **kw) -> dict:
    """FICO HELOC: drop rows whose 23 features are all -9 (10,459 -> 9,871), 90/10 split
    (8,883/988), special values recoded with training statistics (:func:`_fico_features`),
    standardized on train. Label: RiskPerformance, Bad = 0, Good = 1 (LabelEncoder order)."""
    raw = pd.read_csv(paths["heloc/heloc_dataset_v1.csv"])
    if FICO_LABEL not in raw.columns or raw.shape[1] != 24:
        raise DataFileError(f"heloc/heloc_dataset_v1.csv: expected {FICO_LABEL} + 23 feature "
                            f"columns, got {list(raw.columns)}")
    feats = raw.drop(columns=FICO_LABEL)
    keep = (feats > -9).any(axis=1).to_numpy()
    raw, feats = raw[keep], feats[keep]
    y = (raw[FICO_LABEL] == "Good").to_numpy(np.int64)
    tr, te = split_rows(len(raw), 0.1)
    x = _fico_features(feats, tr).to_numpy(np.float64)
    ztr, zte, mean, scale = standardize(x[tr], x[te])
    ids = raw.index.to_numpy(np.int64)
    return dict(X_train=ztr, y_train=y[tr], X_test=zte, y_test=y[te],
                ids_train=ids[tr], ids_test=ids[te], feature_names=list(feats.columns),
                raw_train=raw.iloc[tr], raw_test=raw.iloc[te],
                extra=dict(x_mean=mean, x_std=scale, classes=["Bad", "Good"]))
