"""The experiment of paper §6.1 for one dataset, as steps the notebooks call in order: choose the
left-out and test instances and load theta^f (``setup``), run the gold standard (``gold_runs``)
and every approximation (``methods``; ``damping`` sweeps, ``assumption1`` for the true-Hessian
solves), evaluate them against the gold standard and its noise ceiling (``evaluation``), the
studies of the appendix (``studies``), Figure 2 over datasets (``summary``), qualitative examples
(``examples``) and notebook 08's yardsticks (``yardsticks``: group leave-out, the LDS two ways,
the noise ceiling). Each step reads and writes ``results/<profile>/<dataset>/``; ``records``
holds what a stored result depends on (kept by :mod:`fimoda.store`).
"""
from ...io import load_json
from .assumption1 import ASSUMPTION1_METHODS, assumption1_damping, smallest_hessian_eigenvalue
from .damping import damping_sweep, damping_sweeps, load_damping_sweep
from .evaluation import (ceiling_fractions, evaluate, evaluation_ceiling, evaluation_gold,
                         evaluation_table, mechanism_curves, save_table)
from .examples import influential_examples
from .gold_runs import (eval_unit, gold_augment, gold_path, gold_reader_inputs, gold_run,
                        gold_settings, load_gold, run_gold, run_retrain)
from .methods import (MethodFailed, fit_rows, load_scores, make_attributor, method_config,
                      run_method, run_methods, scores_path, scores_reader_inputs)
from .records import StaleResult, final_model_source
from .setup import (check_parameters, dataset_summary, final_model, load_data, out_dir, run_config,
                    select_loo_indices, select_test_indices, setup, tensors)
from .studies import (mislabel_applies, mislabel_detection, retrain_comparison, seed_reliability,
                      seeds_study)
from .summary import adam_figure, gold_datasets, grid_name, summary, summary_figure, \
    with_results

__all__ = ["setup", "run_config", "load_data", "final_model", "dataset_summary", "select_loo_indices",
           "select_test_indices", "tensors", "out_dir", "method_config", "fit_rows",
           "make_attributor", "MethodFailed", "run_method", "run_methods", "load_scores",
           "ASSUMPTION1_METHODS", "smallest_hessian_eigenvalue", "assumption1_damping",
           "damping_sweep", "damping_sweeps", "load_damping_sweep", "gold_settings", "eval_unit",
           "load_gold", "run_gold", "gold_run", "gold_augment", "run_retrain", "evaluation_gold", "evaluate",
           "evaluation_ceiling", "ceiling_fractions", "evaluation_table", "save_table",
           "mechanism_curves", "seed_reliability",
           "seeds_study", "retrain_comparison", "mislabel_applies", "mislabel_detection",
           "gold_datasets", "with_results", "summary", "grid_name", "summary_figure", "adam_figure",
           "influential_examples", "load_json", "gold_path", "scores_path", "StaleResult",
           "final_model_source", "gold_reader_inputs", "scores_reader_inputs", "check_parameters"]
