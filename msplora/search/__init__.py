"""Optuna search over the pyramid: top rank, decay, level count, mid grouping (+ alpha, lr).

space.py      the space file, define-by-run sampling of one pyramid, the model's shape
study.py      storage (journal file | SQLite | PostgreSQL), sampler, pruner, the study
objective.py  one trial = one fit (``run_fit`` is the single call into training)
workers.py    workers on ``study.optimize`` and the ``run`` supervisor that starts them
report.py     best trials, Pareto front, importances, plots, best.yaml
cli.py        ``python -m msplora.search run | worker | report``

run: check space + model -> study (N, seeded points) -> W workers -> N finished trials
                                                         |
         worker: study.optimize(objective, MaxTrialsCallback, ...) on the shared storage
                 (heartbeat + RetryHeartbeatStaleTrialCallback on RDB; run re-queues the
                 trials of its own dead workers on every storage)
"""

from msplora.search.objective import TrialContext, fit_trial, make_objective, run_fit
from msplora.search.report import param_importances, report
from msplora.search.space import (
    ModelInfo,
    SearchError,
    Space,
    adapter_params,
    check_sampleable,
    load_space,
    mid_choices,
    model_info,
    overlay_of,
    sample_levels,
    sample_options,
)
from msplora.search.study import counts, create_study, load_study, open_storage, redact, storage_url
from msplora.search.workers import reap_dead_workers, work, worker_devices

__all__ = [
    "ModelInfo",
    "SearchError",
    "Space",
    "TrialContext",
    "adapter_params",
    "check_sampleable",
    "counts",
    "create_study",
    "fit_trial",
    "load_space",
    "load_study",
    "make_objective",
    "mid_choices",
    "model_info",
    "open_storage",
    "overlay_of",
    "param_importances",
    "reap_dead_workers",
    "redact",
    "report",
    "run_fit",
    "sample_levels",
    "sample_options",
    "storage_url",
    "work",
    "worker_devices",
]
