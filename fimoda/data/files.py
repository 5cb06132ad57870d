"""Raw data files: where they live, which files are known-good, verifying and downloading them.

:func:`data_dir` and :func:`cache_dir` locate the raw files and the cache of built arrays;
:data:`SOURCES` lists every known raw file (path under the data dir, sha256 / md5 or content
fingerprint, public URL or where to get it by hand); :func:`verify_file` checks a file against it
(:class:`ChecksumError`); :func:`ensure_files` gives the paths a dataset needs, downloading missing
files atomically when allowed and the source host answers (``download=None``: only when online;
never in the tests), else raising one :class:`DataFileError` that says where to get them.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from ..progress import progress_bar

from .. import io as fio


class DataFileError(Exception):
    """A data file is missing (and cannot be downloaded) or cannot be used."""


class ChecksumError(DataFileError):
    """A data file is not the known-good file (corrupted, truncated or a different version)."""


def env_dir(var: str, default: Path) -> Path:
    return Path(os.environ.get(var) or default).expanduser()


def data_dir() -> Path:
    """The raw-data folder: ``$FIMODA_DATA_DIR``, else ``<repo>/data/raw``;
    :class:`DataFileError` when that names a file rather than a folder."""
    d = env_dir("FIMODA_DATA_DIR", fio.REPO_ROOT / "data" / "raw")
    if d.exists() and not d.is_dir():
        raise DataFileError(f"FIMODA_DATA_DIR is a file ({d}), not a folder: point it at the "
                            "folder that holds the data files (layout in data/README.md)")
    return d


def cache_dir() -> Path:
    """The processed-array cache: ``$FIMODA_CACHE_DIR``, else ``<repo>/data/cache``."""
    return env_dir("FIMODA_CACHE_DIR", fio.REPO_ROOT / "data" / "cache")


# ---------------------------------------------------------------------------------------------
# Known-good files
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One raw file: where it goes under the data dir and how it is checked and obtained.

    A file is accepted when its sha256 (or md5) equals the known-good value, or, where bytes
    legitimately differ between faithful copies, when a fingerprint of its *content* does
    (``content``: ``"xls-values"`` = sha256 of the parsed cell values, ``"gunzip"`` = sha256 of
    the decompressed bytes). With no known value at all the file is accepted and its sha256
    recorded."""
    path: str
    sha256: Optional[str] = None
    md5: Optional[str] = None
    content: Optional[str] = None
    content_sha256: Optional[str] = None
    url: Optional[str] = None
    member: Optional[str] = None      # file inside the archive at ``url``
    origin: str = ""                  # human-readable origin / where to get it by hand


_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases"
_FMNIST = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion"
_GLUE_SST2 = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
_ACS_2018 = "https://www2.census.gov/programs-surveys/acs"
FOLKTABLES_PUMS = "folktables/2018/1-Year/psam_p25.csv"
FOLKTABLES_DEFS = "folktables/2018/1-Year/definition.csv"

SOURCES: dict[str, Source] = {s.path: s for s in [
    # Excel rewrites metadata on save: 37 faithful copies have 37 hashes, so the cell values are
    # what is checked (fingerprint from the copy in ../shared/data, identical to UCI's values).
    Source("concrete/Concrete_Data.xls",
           sha256="290e6a8f40eee570588020fae597bfb77f5627017a6c868c1314f6f9b5809ebb",
           content="xls-values",
           content_sha256="c2dc61f26d1ebeb12e6cfdb530e8a3bdca5607755bf1b4ab1836073be3fc70b6",
           url=f"{_UCI}/concrete/compressive/Concrete_Data.xls",
           origin="UCI Concrete Compressive Strength (I-Cheng Yeh), CC BY 4.0"),
    Source("energy/ENB2012_data.xlsx",
           sha256="0089fcffc1415e41e2ff63730cca5280efe54fc43d722dfde1b0aaa808e35dc4",
           url=f"{_UCI}/00242/ENB2012_data.xlsx",
           origin="UCI Energy Efficiency (Tsanas & Xifara), CC BY 4.0"),
    Source("heloc/heloc_dataset_v1.csv",
           sha256="e5a914f742ad7f8472c5417902ec06b321ebc5de1d68ec13f136d62c87a7fbf3",
           origin="FICO Explainable Machine Learning Challenge (HELOC). FICO offers no public "
                  "download URL: request the data set (accepting FICO's terms) at "
                  "https://community.fico.com/s/explainable-machine-learning-challenge"),
    Source("adult/adult.data",
           sha256="5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
           url=f"{_UCI}/adult/adult.data", origin="UCI Adult (Becker & Kohavi), CC BY 4.0"),
    Source("adult/adult.test",
           sha256="a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
           url=f"{_UCI}/adult/adult.test", origin="UCI Adult (Becker & Kohavi), CC BY 4.0"),
    # Debian re-gzipped the Zalando files, so the decompressed bytes are what is checked.
    Source("fashion-mnist/train-images-idx3-ubyte.gz",
           sha256="b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
           content="gunzip",
           content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
           url=f"{_FMNIST}/train-images-idx3-ubyte.gz", origin="Fashion-MNIST (Zalando), MIT"),
    Source("fashion-mnist/train-labels-idx1-ubyte.gz",
           sha256="0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
           content="gunzip",
           content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
           url=f"{_FMNIST}/train-labels-idx1-ubyte.gz", origin="Fashion-MNIST (Zalando), MIT"),
    Source("fashion-mnist/t10k-images-idx3-ubyte.gz",
           sha256="cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
           content="gunzip",
           content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
           url=f"{_FMNIST}/t10k-images-idx3-ubyte.gz", origin="Fashion-MNIST (Zalando), MIT"),
    Source("fashion-mnist/t10k-labels-idx1-ubyte.gz",
           sha256="8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
           content="gunzip",
           content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
           url=f"{_FMNIST}/t10k-labels-idx1-ubyte.gz", origin="Fashion-MNIST (Zalando), MIT"),
    Source("sst2/train.tsv",
           sha256="48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
           url=_GLUE_SST2, member="SST-2/train.tsv", origin="GLUE SST-2 (Socher et al. 2013)"),
    Source("sst2/dev.tsv",
           sha256="54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
           url=_GLUE_SST2, member="SST-2/dev.tsv", origin="GLUE SST-2 (Socher et al. 2013)"),
    Source("cifar10/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
           url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
           origin="CIFAR-10 (Krizhevsky 2009), python version"),
    # No published checksum of the census file: accepted as found, its sha256 is recorded.
    Source(FOLKTABLES_PUMS, url=f"{_ACS_2018}/data/pums/2018/1-Year/csv_pma.zip",
           member="psam_p25.csv",
           origin="US Census ACS PUMS 2018 1-Year, Massachusetts persons (read by folktables)"),
    Source(FOLKTABLES_DEFS,
           url=f"{_ACS_2018}/tech_docs/pums/data_dict/PUMS_Data_Dictionary_2018.csv",
           origin="US Census ACS PUMS 2018 data dictionary (optional: decodes raw tables)"),
]}


# ---------------------------------------------------------------------------------------------
# Verifying and downloading
# ---------------------------------------------------------------------------------------------

def _hashes(path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def read_excel(path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pandas deprecates the xlrd engine
        return pd.read_excel(path)


def content_fingerprint(kind: str, path) -> str:
    """Fingerprint of a file's content, independent of container metadata.

    ``xls-values``: sha256 over ``b"<rows>x<cols>"`` + the float64 cell values rounded to 6
    decimals (C order); ``gunzip``: sha256 of the decompressed bytes."""
    if kind == "xls-values":
        a = np.round(read_excel(path).to_numpy(np.float64), 6)
        return hashlib.sha256(f"{a.shape[0]}x{a.shape[1]}".encode()
                              + np.ascontiguousarray(a).tobytes()).hexdigest()
    if kind == "gunzip":
        h = hashlib.sha256()
        with gzip.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    raise ValueError(f"unknown content fingerprint {kind!r}")


def verify_file(path, rel: Optional[str] = None) -> str:
    """Check ``path`` against the known-good :class:`Source` ``SOURCES[rel]`` (``rel`` defaults
    to the path relative to its data dir's layout, i.e. the last two components) and return its
    sha256. Raises :class:`ChecksumError` naming the file, the expected and the actual value."""
    path = Path(path)
    rel = rel or "/".join(path.parts[-2:])
    src = SOURCES.get(rel)
    if src is None:
        raise ValueError(f"no known source for {rel!r}; known: {sorted(SOURCES)}")
    sha, md5 = _hashes(path)
    if (src.sha256 and sha == src.sha256) or (src.md5 and md5 == src.md5):
        return sha
    if src.content:
        try:
            fp = content_fingerprint(src.content, path)
        except Exception as e:   # truncated gzip, unparsable workbook, ...
            raise ChecksumError(
                f"{rel} at {path} is corrupted: sha256 {sha} is not the known-good "
                f"{src.sha256} and its content cannot be read ({type(e).__name__}: {e}). "
                f"Delete it and get it again from {src.url or src.origin}") from None
        if fp == src.content_sha256:
            return sha
        raise ChecksumError(
            f"{rel} at {path} is not the known-good file: {src.content} content fingerprint "
            f"expected {src.content_sha256}, actual {fp} (file sha256 {sha}, known-good "
            f"{src.sha256}). Delete it and get it again from {src.url or src.origin}")
    if src.sha256 or src.md5:
        want = f"sha256 {src.sha256}" if src.sha256 else f"md5 {src.md5}"
        got = f"sha256 {sha}" if src.sha256 else f"md5 {md5}"
        raise ChecksumError(
            f"{rel} at {path} is corrupted or not the expected file: expected {want}, actual "
            f"{got}. Delete it and get it again from {src.url or src.origin}")
    return sha


def _online(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included: the
    attempt runs in a daemon thread, so a hanging resolver cannot block the caller)."""
    ok = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).hostname or ""


def _fetch(url: str, dest: Path, desc: str) -> None:
    """Stream ``url`` into ``dest`` (a temporary path the caller owns), with a progress bar."""
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as fh:
        total = int(r.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
            for block in iter(lambda: r.read(1 << 20), b""):
                fh.write(block)
                bar.update(len(block))


def _extract(archive: Path, member: str, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise DataFileError(f"{member} is not a regular file in {archive}")
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


def _download(sources: list[Source], root: Path) -> None:
    """Download ``sources`` into ``root`` atomically: each archive is fetched once into a
    temporary file, each file extracted to a temporary file, verified, then renamed into place.
    Nothing is left behind on failure."""
    by_url: dict[str, list[Source]] = {}
    for s in sources:
        by_url.setdefault(s.url, []).append(s)
    for url, group in by_url.items():
        folder = (root / group[0].path).parent
        folder.mkdir(parents=True, exist_ok=True)
        tmps = []
        try:
            fd, fetched = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".part")
            os.close(fd)
            tmps.append(fetched)
            name = Path(urllib.parse.urlparse(url).path).name
            _fetch(url, Path(fetched), desc=f"download {name}")
            for s in group:
                dest = root / s.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                if s.member:
                    fd, part = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name,
                                                suffix=".part")
                    os.close(fd)
                    tmps.append(part)
                    _extract(Path(fetched), s.member, Path(part))
                else:
                    part = fetched
                verify_file(part, s.path)
                os.replace(part, dest)
        except ChecksumError as e:
            raise ChecksumError(f"download from {url} failed verification: {e}") from None
        except DataFileError:
            raise
        except Exception as e:
            raise DataFileError(f"downloading {url} for {[s.path for s in group]} failed: "
                                f"{type(e).__name__}: {e}") from e
        finally:
            for t in tmps:
                if os.path.exists(t):
                    os.unlink(t)


def _missing_message(missing: list[Source], root: Path, why: str) -> str:
    lines = [f"missing data file(s) under {root} ({why}):"]
    for s in missing:
        where = (f"download {s.url}" + (f" and take {s.member} from it" if s.member else "")
                 if s.url else "no public download")
        lines.append(f"  - {s.path}: expected at {root / s.path}; {s.origin}; {where}")
    lines.append("Put the file(s) there, or point FIMODA_DATA_DIR at a folder that has them "
                 "(see data/README.md).")
    return "\n".join(lines)


def ensure_files(rels: tuple, root: Path, download: Optional[bool],
            optional: tuple = ()) -> dict[str, Path]:
    """Paths of the required files ``rels`` under ``root``, downloading the missing ones when
    ``download`` is True (or None and the source host answers). Optional files are fetched
    alongside required ones and are returned only when present."""
    missing = [SOURCES[r] for r in rels if not (root / r).is_file()]
    if missing:
        no_url = [s for s in missing if not s.url]
        if download is False:
            raise DataFileError(_missing_message(missing, root, "download=False"))
        if no_url:
            raise DataFileError(_missing_message(missing, root, "no public download URL"))
        hosts = sorted({_host(s.url) for s in missing if not s.url.startswith("file:")})
        offline = [h for h in hosts if not _online(h)]      # file:// mirrors need no network
        if offline:
            raise DataFileError(_missing_message(
                missing, root, f"offline: {', '.join(offline)} cannot be reached"))
        extra = [SOURCES[r] for r in optional if not (root / r).is_file()]
        _download(missing, root)
        try:
            if extra:
                _download(extra, root)
        except DataFileError as e:
            warnings.warn(f"optional file not downloaded: {e}")
    return {r: root / r for r in tuple(rels) + tuple(optional) if (root / r).is_file()}
