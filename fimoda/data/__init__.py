"""The datasets of the paper (App. D.1): verified raw files -> preprocessed train/test arrays.

Reading the modules in order:

1. :mod:`.files`: where the files live (:func:`data_dir`, :func:`cache_dir`), the table of
   known-good files (:data:`SOURCES`: relative path, sha256, public URL or where to get it),
   verifying a file (:func:`verify_file`) and downloading it atomically when it is missing and
   the source host answers (``download=None``: only when online; never in the tests);
2. one builder per dataset that reproduces the paper's preprocessing (split with scikit-learn's
   ``train_test_split(random_state=0)``, standardization fitted on the training split, both in
   :mod:`.tabular`): :mod:`.regression`, :mod:`.fico`, :mod:`.income`, :mod:`.images` (with
   :func:`augment_images`, training-time image augmentation of the CIFAR-10 recipe), :mod:`.sst2`;
3. :mod:`.cache`: the built arrays are written once to ``<cache>/<name>[_<encoder>].npz`` with a
   JSON record of the source sha256s; a later call whose sources have other hashes rebuilds it;
4. :mod:`.dataset`: :class:`Dataset`, :class:`Loader` (how one dataset is loaded) and
   :func:`load_dataset`, the one entry point;
5. :mod:`.specs`: one :class:`DatasetSpec` per dataset (its loader, model, the paper's
   settings, the profiles' reductions, its place in Figure 2 and the pipeline) and the registry
   (:func:`register_dataset`) every per-dataset table is derived from; :mod:`.catalog`: the
   paper's datasets, registered on import.

Datasets (``name``): ``concrete``, ``energy`` (regression), ``fico``, ``folktables``, ``adult``
(binary classification), ``cifar10``, ``fashion_mnist`` (10 classes, images) and ``sst2`` (binary,
text). ``adult`` and ``fashion_mnist`` are offline stand-ins for ``folktables`` and ``cifar10``
(their originals cannot be had here) and say so in ``Dataset.stand_in_for``.
"""
from .cache import CACHE_FORMAT
from .dataset import DATASETS, LOADERS, Dataset, Loader, load_dataset
from .specs import DatasetSpec, Overrides, get_spec, register_dataset, unregister_dataset
from . import catalog  # noqa: F401  (registers the paper's datasets)
from .files import (SOURCES, ChecksumError, DataFileError, Source, cache_dir,
                    content_fingerprint, data_dir, verify_file)
from .images import augment_images

__all__ = ["CACHE_FORMAT", "DATASETS", "LOADERS", "Dataset", "Loader", "load_dataset",
           "DatasetSpec", "Overrides", "get_spec", "register_dataset", "unregister_dataset",
           "SOURCES", "ChecksumError", "DataFileError", "Source", "cache_dir",
           "content_fingerprint", "data_dir", "verify_file", "augment_images"]
