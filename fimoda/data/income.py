"""Income prediction: Folktables ACSIncome (Massachusetts 2018) and UCI Adult, its stand-in.

Both become dummy-coded tables, label income > 50K, split 75/25 (``random_state=0``) with only
the numeric columns (age, hours worked) standardized on the training split. Adult replaces
ACSIncome where the census file cannot be had (``Dataset.stand_in_for``).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .files import FOLKTABLES_DEFS, FOLKTABLES_PUMS, DataFileError
from .tabular import dummies, split_rows, standardize


def _classification_tabular(x: pd.DataFrame, y: np.ndarray, ids: np.ndarray, numeric: list,
                            raw: pd.DataFrame) -> dict:
    """75/25 split (random_state=0); only the ``numeric`` columns standardized (fit on train)."""
    tr, te = split_rows(len(x), 0.25)
    a = x.to_numpy(np.float64)
    num = [x.columns.get_loc(c) for c in numeric]
    ztr, zte = a[tr].copy(), a[te].copy()
    ztr[:, num], zte[:, num], mean, scale = standardize(a[tr][:, num], a[te][:, num])
    return dict(X_train=ztr, y_train=y[tr], X_test=zte, y_test=y[te],
                ids_train=ids[tr], ids_test=ids[te], feature_names=list(x.columns),
                raw_train=raw.iloc[tr], raw_test=raw.iloc[te],
                extra=dict(standardized=list(numeric), x_mean=mean, x_std=scale,
                           classes=["<=50K", ">50K"]))


ACS_NUMERIC = ["AGEP", "WKHP"]
ACS_CATEGORICAL = ["COW", "SCHL", "MAR", "OCCP", "POBP", "RELP", "SEX", "RAC1P"]


def build_folktables(paths, root, **kw) -> dict:
    """Folktables ACSIncome, Massachusetts 2018 1-Year (paper D.1): folktables' Adult-like filter
    (AGEP > 16, PINCP > 100, WKHP > 0, PWGTP >= 1), label PINCP > 50,000, the 8 categorical
    features dummy-coded on their codes (e.g. ``OCCP_9300``), 75/25 split, AGEP and WKHP
    standardized. The real file gives 40,114 rows x 791 features (target mean 0.46844)."""
    from folktables import ACSDataSource, ACSIncome, generate_categories
    from folktables.acs import adult_filter
    source = ACSDataSource(survey_year="2018", horizon="1-Year", survey="person",
                           root_dir=str(root / "folktables"))
    acs = source.get_data(states=["MA"], download=False)
    need = set(ACSIncome.features) | {"PINCP", "PWGTP"}
    if not need <= set(acs.columns):
        raise DataFileError(f"{FOLKTABLES_PUMS}: columns {sorted(need - set(acs.columns))} "
                            "are missing; is it the ACS PUMS person file?")
    kept = adult_filter(acs)
    feats, label, _ = ACSIncome.df_to_pandas(acs)      # the same filter; NaN -> -1
    feats = feats.astype({c: np.int64 for c in ACS_CATEGORICAL})
    x = dummies(feats, ACS_NUMERIC, ACS_CATEGORICAL)
    y = label.to_numpy().ravel().astype(np.int64)
    ids = kept.index.to_numpy(np.int64)
    raw = kept[list(ACSIncome.features) + ["PINCP"]].copy()
    if FOLKTABLES_DEFS in paths:         # decode the codes for qualitative tables
        try:
            cats = generate_categories(ACS_CATEGORICAL, source.get_definitions(download=False))
        except Exception as e:
            warnings.warn(f"{FOLKTABLES_DEFS} not usable ({type(e).__name__}: {e}); raw "
                          "tables keep the census codes")
            cats = {}
        for c, m in cats.items():
            raw[c] = raw[c].map(lambda v, m=m: m.get(float(v), v) if pd.notna(v) else v)
    raw["income>50K"] = y
    return _classification_tabular(x, y, ids, ACS_NUMERIC, raw)


ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
                 "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
                 "hours-per-week", "native-country", "income"]
ADULT_NUMERIC = ["age", "hours-per-week"]
ADULT_CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship",
                     "race", "sex", "native-country"]


def build_adult(paths, root, **kw) -> dict:
    """UCI Adult, the stand-in for Folktables ACSIncome (whose columns AGEP, COW, SCHL, MAR,
    OCCP, RELP, RAC1P, SEX, WKHP, POBP these 10 map onto): adult.data and adult.test pooled
    (ids: adult.data rows 0..32560, then adult.test rows from 32561), rows with '?' dropped,
    categoricals dummy-coded, age and hours-per-week standardized, label income > 50K,
    75/25 split (random_state=0)."""
    kw_csv = dict(header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values=["?"],
                  keep_default_na=False)
    a = pd.read_csv(paths["adult/adult.data"], **kw_csv)
    b = pd.read_csv(paths["adult/adult.test"], skiprows=1, **kw_csv)   # "|1x3 Cross validator"
    if len(a) != 32561 or len(b) != 16281:
        raise DataFileError(f"adult: expected 32561 + 16281 rows, got {len(a)} + {len(b)}")
    df = pd.concat([a, b], ignore_index=True)
    df["income"] = df["income"].str.rstrip(".")
    bad = set(df["income"].unique()) - {"<=50K", ">50K"}
    if bad:
        raise DataFileError(f"adult: unexpected income labels {sorted(bad)}")
    df = df.dropna(subset=ADULT_NUMERIC + ADULT_CATEGORICAL)
    y = (df["income"] == ">50K").to_numpy(np.int64)
    x = dummies(df, ADULT_NUMERIC, ADULT_CATEGORICAL)
    return _classification_tabular(x, y, df.index.to_numpy(np.int64), ADULT_NUMERIC, df)
