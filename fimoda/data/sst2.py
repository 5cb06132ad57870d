"""GLUE SST-2 (binary sentiment, text): sentences -> token ids and attention masks.

train.tsv is the training set and the dev sentences the test set; both are tokenized with the
encoder's tokenizer to (N, 2, 128) and cast to int64 on every load (:func:`finish_text`).
:func:`tokenizer_key` fingerprints the tokenizer files for the cache key.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd
from ..progress import progress_bar

from .. import io as fio
from .files import DataFileError

TEXT_MAX_LENGTH = 128     # SST-2: tokenizer max length (paper App. D.1)


def _read_sst2(path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                     dtype={"sentence": str})
    if list(df.columns) != ["sentence", "label"]:
        raise DataFileError(f"{path}: expected columns sentence, label; got {list(df.columns)}")
    return df


def _tokenizer(encoder: str):
    """``transformers.AutoTokenizer`` of ``encoder``, resolved by
    :func:`fimoda.models.resolve_encoder` (the offline all-MiniLM-L6-v2 package for the default);
    ``HF_HUB_OFFLINE=1`` unless set otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from ..models import resolve_encoder
    return AutoTokenizer.from_pretrained(resolve_encoder(encoder))


def _tokenize(tok, sentences: list, max_length: int, desc: str) -> np.ndarray:
    """(N, 2, L) int32: input ids and attention mask, padded / truncated to ``max_length``."""
    out = np.zeros((len(sentences), 2, max_length), np.int32)
    step = 2048
    for i in progress_bar(range(0, len(sentences), step), desc=desc, leave=False,
                  disable=len(sentences) <= step):
        enc = tok(sentences[i:i + step], padding="max_length", truncation=True,
                  max_length=max_length, return_tensors="np")
        out[i:i + step, 0] = enc["input_ids"]
        out[i:i + step, 1] = enc["attention_mask"]
    return out


def build_sst2(paths, root, encoder=None, limit=None, **kw) -> dict:
    """GLUE SST-2: train.tsv (67,349) for training, the 872 dev sentences as the test set (GLUE's
    test labels are hidden); tokenized with the encoder's tokenizer, max length 128. ``limit``
    keeps the first ``limit`` rows of each (quick runs; not cached)."""
    tr, te = _read_sst2(paths["sst2/train.tsv"]), _read_sst2(paths["sst2/dev.tsv"])
    if limit is not None:
        tr, te = tr.iloc[:limit], te.iloc[:limit]
    tok = _tokenizer(encoder)
    parts = dict(X_train=_tokenize(tok, tr.sentence.tolist(), TEXT_MAX_LENGTH, "tokenize train"),
                 y_train=tr.label.to_numpy(np.int64),
                 X_test=_tokenize(tok, te.sentence.tolist(), TEXT_MAX_LENGTH, "tokenize dev"),
                 y_test=te.label.to_numpy(np.int64),
                 ids_train=tr.index.to_numpy(np.int64), ids_test=te.index.to_numpy(np.int64),
                 feature_names=["input_ids", "attention_mask"], raw_train=tr, raw_test=te,
                 extra=dict(encoder=encoder, max_length=TEXT_MAX_LENGTH,
                            tokenizer=str(getattr(tok, "name_or_path", "")),
                            sentences_train=tr.sentence.tolist(),
                            sentences_test=te.sentence.tolist(), classes=["negative", "positive"]))
    n_trunc = int((parts["X_train"][:, 1, -1] == 1).sum() + (parts["X_test"][:, 1, -1] == 1).sum())
    parts["extra"]["n_truncated"] = n_trunc
    return parts


def finish_text(parts: dict) -> dict:
    parts["X_train"] = parts["X_train"].astype(np.int64)
    parts["X_test"] = parts["X_test"].astype(np.int64)
    return parts


def tokenizer_key(encoder: str) -> dict:
    """sha256 of the tokenizer files of ``encoder`` (a changed tokenizer invalidates the cache)."""
    from ..models import resolve_encoder
    p = Path(resolve_encoder(encoder))
    files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
    return {f: fio.sha256_file(p / f) for f in files if (p / f).is_file()} or {"name": encoder}
