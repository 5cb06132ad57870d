"""Training of the final model theta^f (paper App. D.2), one package.

Reading the modules in order:

1. :mod:`.rows`: which training rows theta^f sees (validation rows held out for epoch selection,
   the random subset of reduced settings): :func:`train_rows`, and :func:`training_dataset`, the
   dataset restricted to them, which attribution and further training must use;
2. :mod:`.loop`: how theta^f is trained whatever keeps it: the choices the paper leaves open per
   model family (:data:`PROCEDURE`), the optimiser and schedule, the training loop
   (:func:`fit_model`) and a model's metrics (:func:`evaluate`);
3. :mod:`.text_trunk`: the frozen pretrained trunk of a text model, run once per sentence
   (:func:`trunk_features`, :func:`frozen_trunk`);
4. :mod:`.baselines`: the trivial predictor every theta^f must clearly beat
   (:class:`BaselineMargin`, :data:`FINAL_MODEL_MARGIN`) and the check;
5. :mod:`.final_model`: :func:`train_final_model` trains theta^f once, saves it with its record
   and reuses it only while config, procedure and data match; :func:`load_final_model` loads it.

What is trained is described by :class:`fimoda.settings.ExperimentConfig` (its ``train`` part:
:class:`fimoda.settings.TrainConfig`).
"""
from .baselines import (FINAL_MODEL_MARGIN, BaselineMargin, TrivialModelError, baseline_check,
                        baseline_table, require_beaten, trivial_baseline)
from .final_model import (MODEL_FILE, RECORD_FILE, load_final_model, load_record, model_key,
                          train_final_model)
from .loop import PROCEDURE, evaluate, fit_model, procedure
from .rows import SUBSET_SEED, train_rows, training_dataset
from .text_trunk import TRUNK_FILE, frozen_trunk, trunk_features

__all__ = ["FINAL_MODEL_MARGIN", "BaselineMargin", "TrivialModelError", "baseline_check",
           "baseline_table", "require_beaten", "trivial_baseline", "MODEL_FILE", "RECORD_FILE",
           "load_final_model", "load_record", "model_key", "train_final_model", "PROCEDURE",
           "evaluate", "fit_model", "procedure", "SUBSET_SEED", "train_rows", "training_dataset",
           "TRUNK_FILE", "frozen_trunk", "trunk_features"]
