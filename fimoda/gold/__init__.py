"""Further training from theta^f: the gold standard of final-model-only attribution (paper §3).

For a final model theta^f, seeds s = 1..S (the batch order xi_s) and left-out instances i in L,
every seed runs the further-training algorithm A' once on the full set D and once per D_{-i}, all
from theta^f and all with the same batch order, and records the loss g(z_j; theta) of every test
instance after every epoch (or every k steps), including t = 0 (theta^f itself):

    loss_full[s, t, j] = g(z_j; theta_{D,s,t})        loss_loo[s, i, t, j] = g(z_j; theta_{-i,s,t})

The attribution scores (:func:`gold_scores`) are then

    (17)  a[i, t, j] = (1/S) sum_s ( loss_loo[s, i, t, j] - loss_full[s, t, j] )
    (13)  a[i, t, j] = (1/S) sum_s ( loss_loo[s, i, t, j] - (1/n') sum_i' loss_loo[s, i', t, j] )

Every run may leave out a group S of instances instead of one (``groups``: the accepted forms of
the left-out runs; ``loss_loo[s, g]`` is then group g's run).

Modules: ``config`` (:class:`GoldConfig`, :class:`GoldResult`), ``groups`` (what each run leaves
out: an index or a group), ``mechanisms`` (how a run leaves it out: ``remove``, ``subtract``,
registered by name), ``schedule`` (batch orders and the batch plan of every run, augmentation),
``optim`` (SGD/Adam/AdamW on stacked runs), ``engines`` (per-run gradients: mlp, func, loop),
``chunks`` (sizing and training one chunk of runs), ``workdir`` (the resumable work directory:
each (seed, chunk) piece stored with its seed, chunk, config hash and checksum, and checked on
load), ``runner`` (:func:`further_train`, one piece at a time for executors), ``distributed``
(the pieces as Dask tasks; imported on demand), ``infinitesimal`` (the exact derivative of the
test losses in the left-out weight, by forward-mode AD through the whole run), ``scores`` (eqs.
13 and 17), ``reference`` (the one-model loop the tests compare against; LOO re-training from
scratch) and ``store`` (results on disk).
"""
from .config import ENGINES, OPTIMIZERS, SHUFFLES, GoldConfig, GoldResult
from .groups import as_left_out, group_list, is_groups
from .mechanisms import (MECHANISMS, Mechanism, Remove, Subtract, mechanism, mechanism_names,
                         register_mechanism, unregister_mechanism)
from .reference import reference_further_train, retrain_loo
from .runner import further_train
from .schedule import Schedule, epoch_permutations, make_schedule, run_batches
from .scores import ADJUSTMENTS, gold_scores, seed_group_scores
from .store import load_gold_result, save_gold

__all__ = ["GoldConfig", "GoldResult", "further_train", "gold_scores", "seed_group_scores",
           "save_gold", "load_gold_result", "reference_further_train", "retrain_loo", "make_schedule",
           "run_batches", "epoch_permutations", "Schedule", "OPTIMIZERS", "MECHANISMS",
           "SHUFFLES", "ENGINES", "ADJUSTMENTS", "as_left_out", "group_list", "is_groups",
           "Mechanism", "Remove", "Subtract", "mechanism", "mechanism_names",
           "register_mechanism", "unregister_mechanism"]
