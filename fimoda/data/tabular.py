"""Helpers shared by the tabular builders (regression sheets, FICO, Folktables / Adult).

The paper's train/test split (scikit-learn's ``train_test_split(random_state=0)``, App. D.1),
standardization fitted on the training split, and dummy coding of categorical columns.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def split_rows(n: int, test_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of ``train_test_split(range(n), test_size, random_state=0)`` (paper D.1)."""
    from sklearn.model_selection import train_test_split
    tr, te = train_test_split(np.arange(n), test_size=test_size, random_state=0)
    return np.asarray(tr, np.int64), np.asarray(te, np.int64)


def standardize(train: np.ndarray, test: np.ndarray):
    """z = (x - mean_train) / std_train per column (StandardScaler: population std; a constant
    column keeps scale 1)."""
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(train)
    return sc.transform(train), sc.transform(test), sc.mean_, sc.scale_


def dummies(df: pd.DataFrame, numeric: list, categorical: list) -> pd.DataFrame:
    """Numeric columns first, then one 0/1 column per value present of each categorical column
    (pandas ``get_dummies``, all levels kept), float64."""
    d = pd.get_dummies(df[numeric + categorical], columns=categorical, prefix_sep="_",
                       dtype=np.float64)
    return d.astype(np.float64)
