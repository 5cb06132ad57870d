"""The regression sheets: UCI Concrete Compressive Strength and UCI Energy Efficiency.

Each Excel workbook becomes a 90/10 split (``random_state=0``) whose columns, the target
included, are standardized on the training split (paper App. D.1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .files import DataFileError, read_excel
from .tabular import split_rows, standardize


def _regression(df: pd.DataFrame, features: list, target: str) -> dict:
    """90/10 split (random_state=0), every column incl. the target standardized on train."""
    tr, te = split_rows(len(df), 0.1)
    cols = list(features) + [target]
    a = df[cols].to_numpy(np.float64)
    ztr, zte, mean, scale = standardize(a[tr], a[te])
    return dict(
        X_train=ztr[:, :-1], y_train=ztr[:, -1], X_test=zte[:, :-1], y_test=zte[:, -1],
        ids_train=tr, ids_test=te, feature_names=[str(c) for c in features],
        raw_train=df.iloc[tr], raw_test=df.iloc[te],
        extra=dict(x_mean=mean[:-1], x_std=scale[:-1], y_mean=float(mean[-1]),
                   y_std=float(scale[-1]), target=str(target)))


def build_concrete(paths, root, **kw) -> dict:
    """UCI Concrete: 1030 x (8 features + strength); 927/103."""
    df = read_excel(paths["concrete/Concrete_Data.xls"])
    df.columns = [str(c).strip() for c in df.columns]
    if df.shape != (1030, 9):
        raise DataFileError(f"concrete/Concrete_Data.xls: expected 1030x9 cells, got {df.shape}")
    return _regression(df, list(df.columns[:8]), df.columns[8])


def build_energy(paths, root, **kw) -> dict:
    """UCI Energy Efficiency: X1..X8, target Y1 (heating load), Y2 dropped; 691/77."""
    df = read_excel(paths["energy/ENB2012_data.xlsx"]).dropna(how="all").dropna(axis=1, how="all")
    want = [f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"]
    if list(df.columns) != want or len(df) != 768:
        raise DataFileError(f"energy/ENB2012_data.xlsx: expected 768 rows with columns {want}, "
                            f"got {df.shape} {list(df.columns)}")
    return _regression(df.drop(columns="Y2"), want[:8], "Y1")
