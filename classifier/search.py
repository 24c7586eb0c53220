"""Optuna study over `fit`: each trial a nested MLflow run, pruned on the per-epoch validation metric, N workers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm import tqdm

from classifier import tracking
from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.data.layout import read_info
from classifier.errors import UserError
from classifier.search_space import parse_space, suggest
from classifier.search_storage import open_storage
from classifier.train import fit, resolve_monitor

# Trials that count towards --n-trials: a failed trial does not (a dead worker's trial is retried as WAITING).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
STUDY_TAG, TRIAL_TAG = "optuna_study", "optuna_trial"
PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values,
}
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class SearchResult:
    """What a search leaves behind: the study's best trial and the registered champion version, if it changed."""

    study_name: str
    metric: str
    best_value: float | None
    best_params: dict[str, Any]
    counts: dict[str, int]
    parent_run_id: str
    registered_version: str | None


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker process needs to join the study (picklable for `spawn`)."""

    data: Path
    train: TrainConfig
    search: SearchConfig
    study_name: str
    metric: str
    parent_run_id: str
    index: int = 0
    device: str | None = None


def search(config: SearchConfig, train: TrainConfig, data: Path) -> SearchResult:
    """Run (or resume, or join) the study until it holds `config.n_trials` trials, then register the best model."""
    info = read_info(data)
    # the same names as fit's --monitor
    metric = resolve_monitor(config.metric, len(info.classes), info.task == "multi_label")
    maximize = not metric.endswith("loss")
    tunable = [field.name for field in dataclasses.fields(TrainConfig)]
    parse_space(config.space, tunable)
    if config.cv_folds and (info.folds or 0) < config.cv_folds:
        raise UserError(
            f"search: cv_folds={config.cv_folds} needs a dataset prepared with `--folds {config.cv_folds}` or more; "
            f"{data} has {info.folds or 'no'} folds"
        )
    if config.n_workers > 1 and (config.storage or "").startswith("sqlite"):
        raise UserError("--storage sqlite:// does not support parallel workers; use the default journal or postgresql")
    study_name = config.study_name or f"search-{Path(data).resolve().name}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking.connect()
    study = open_study(config, study_name, metric, maximize, stale_trial_handler(train.experiment, config))
    with tracking.start_run(train.experiment, run_name=study_name, tags={STUDY_TAG: study_name}) as run:
        parent_run_id = run.info.run_id
        os.environ["MLFLOW_EXPERIMENT_ID"] = run.info.experiment_id
        tracking.log_summary(parent_run_id, {}, {}, {STUDY_TAG: study_name, "search_metric": metric})
        optuna.storages.fail_stale_trials(study)
        job = WorkerJob(Path(data).resolve(), train, config, study_name, metric, parent_run_id)
        claimed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if len(claimed) < config.n_trials:  # a retry (WAITING) of a dead worker's trial is still to run
            with Progress(study, config.n_trials, metric):
                run_workers(job, config.n_workers)
        return summarise(study, job, maximize)


def open_study(config: SearchConfig, name: str, metric: str, maximize: bool, handler: Any = None) -> optuna.Study:
    """Create the study once (here, in the launcher) or load it, refusing one made for another metric or direction."""
    storage = open_storage(
        config.storage,
        heartbeat_interval=config.heartbeat_interval,
        grace_period=config.grace_period,
        stale_trial_callback=handler,
    )
    direction = "maximize" if maximize else "minimize"
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    held_metric = study.user_attrs.get("metric", metric)
    held_direction = study.direction.name.lower()
    if (held_metric, held_direction) != (metric, direction):
        raise UserError(
            f"--study-name {name}: the study optimises {held_metric} ({held_direction}), not {metric} ({direction}); "
            "use the same --metric or another --study-name"
        )
    study.set_user_attr("metric", metric)
    return study


def stale_trial_handler(experiment: str, config: SearchConfig) -> Any:
    """Heartbeat-stale trials (their worker died): end the orphan MLflow run as FAILED, then queue a retry."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=config.max_retry)

    def handle(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        experiment_id = tracking.experiment_id(experiment)
        tracking.end_orphan_runs(experiment_id, {STUDY_TAG: study.study_name, TRIAL_TAG: str(trial.number)})
        trial.set_user_attr("retry_of", trial.user_attrs.get("retry_of", trial.number))
        retry(study, trial)

    return handle


def run_workers(job: WorkerJob, n_workers: int) -> None:
    """Run the study in this process, or in `n_workers` spawned processes, one GPU each when there are GPUs."""
    if n_workers == 1:
        work(job)
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(index) for index in range(torch.cuda.device_count())]
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=work_in_subprocess,
            args=(dataclasses.replace(job, index=index, device=gpus[index % len(gpus)] if gpus else None),),
            name=f"search-worker-{index}",
        )
        for index in range(n_workers)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join(timeout=60)
        raise
    failed = [process.name for process in processes if process.exitcode != 0]
    if failed:
        raise UserError(f"search: {', '.join(failed)} failed (see the errors above); rerun the command to resume")


def work(job: WorkerJob) -> None:
    """One worker: claim trials of the study until it holds `n_trials` (counting every worker's trials)."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    if job.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.device
    elif not torch.cuda.is_available():
        torch.set_num_threads(job.search.threads_per_worker or max(1, (os.cpu_count() or 1) // job.search.n_workers))
    tracking.connect()
    handler = stale_trial_handler(job.train.experiment, job.search)
    storage = open_storage(
        job.search.storage,
        heartbeat_interval=job.search.heartbeat_interval,
        grace_period=job.search.grace_period,
        stale_trial_callback=handler,
    )
    study = optuna.load_study(
        study_name=job.study_name, storage=storage, sampler=make_sampler(job), pruner=make_pruner(job)
    )
    distributions = parse_space(job.search.space, [field.name for field in dataclasses.fields(TrainConfig)])
    study.optimize(
        Objective(job, distributions),
        n_trials=job.search.n_trials,
        timeout=job.search.timeout,
        callbacks=[MaxTrialsCallback(job.search.n_trials, states=COUNTED_STATES)],
        catch=(torch.OutOfMemoryError,),
    )


def work_in_subprocess(job: WorkerJob) -> None:
    """`work` in a spawned process: Ctrl-C ends it quietly (its trial is already marked failed, its run KILLED)."""
    try:
        work(job)
    except KeyboardInterrupt:
        sys.exit(130)


def make_sampler(job: WorkerJob) -> optuna.samplers.BaseSampler:
    """TPE (default) or random, seeded differently per worker so that workers do not propose the same points."""
    seed = job.search.seed + job.index
    if job.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=job.search.startup_trials)


def make_pruner(job: WorkerJob) -> optuna.pruners.BasePruner:
    """Median or Hyperband pruning on the per-epoch validation metric (one step per epoch), or none."""
    if job.search.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=job.search.startup_trials, n_warmup_steps=job.search.prune_warmup_epochs
        )
    if job.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, job.search.prune_warmup_epochs),
            max_resource=job.train.epochs * (job.search.cv_folds or 1),  # cross-validation reports fold after fold
        )
    return optuna.pruners.NopPruner()


class Objective:
    """Train one sampled configuration with `fit`, reporting each epoch's validation metric to the pruner."""

    def __init__(self, job: WorkerJob, distributions: dict[str, BaseDistribution]) -> None:
        self.job = job
        self.distributions = distributions

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.distributions)
        fixed = {**dataclasses.asdict(self.job.train), "monitor": self.job.metric}
        config = build_config(TrainConfig, fixed, params, origin=f"trial {trial.number}")
        tags = {STUDY_TAG: self.job.study_name, TRIAL_TAG: str(trial.number)}
        if "retry_of" in trial.user_attrs:
            tags["optuna_retry_of"] = str(trial.user_attrs["retry_of"])
        if self.job.search.cv_folds:
            return self.cross_validate(trial, config, tags, params)
        result = fit(
            config,
            self.job.data,
            parent_run_id=self.job.parent_run_id,
            run_name=f"trial-{trial.number}",
            tags=tags,
            on_epoch_end=self.reporter(trial),
        )
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("best_metrics", result.best_metrics)
        if result.model_uri:
            trial.set_user_attr("model_uri", result.model_uri)
        return result.best_metrics[self.job.metric]

    def cross_validate(
        self, trial: optuna.Trial, config: TrainConfig, tags: dict[str, str], params: dict[str, Any]
    ) -> float:
        """The mean of the best metric over folds 0..k-1; fold k reports epochs at steps k*epochs + epoch."""
        scores = []
        with tracking.start_run(config.experiment, f"trial-{trial.number}", tags, self.job.parent_run_id) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            for fold in range(self.job.search.cv_folds):
                result = fit(
                    config,
                    self.job.data,
                    parent_run_id=run.info.run_id,
                    run_name=f"trial-{trial.number}-fold-{fold}",
                    tags=tags,
                    fold=fold,
                    on_epoch_end=self.reporter(trial, offset=fold * config.epochs),
                    log_model=False,
                )
                scores.append(result.best_metrics[self.job.metric])
            score = float(np.mean(scores))
            tracking.log_summary(run.info.run_id, {f"cv_mean_{self.job.metric}": score}, params, {})
        return score

    def reporter(self, trial: optuna.Trial, offset: int = 0) -> Any:
        metric = self.job.metric

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if metric not in metrics:
                raise UserError(f"search: metric '{metric}' is not logged by training; use one of {', '.join(metrics)}")
            trial.report(metrics[metric], offset + epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric}={metrics[metric]:.4f} at epoch {epoch}")

        return report


class Progress:
    """A tqdm bar over the study's finished trials (all workers, all machines), with pruned/failed/best."""

    def __init__(self, study: optuna.Study, total: int, metric: str, interval_s: float = 2.0) -> None:
        self.study, self.metric, self.interval_s = study, metric, interval_s
        self.bar = tqdm(total=total, desc=f"study {study.study_name}", unit="trial", file=sys.stderr)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.refresh()
        self.bar.close()

    def poll(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.refresh()

    def refresh(self) -> None:
        counts = trial_counts(self.study)
        self.bar.n = min(self.bar.total, counts["complete"] + counts["pruned"])
        best = best_value(self.study)
        self.bar.set_postfix(
            pruned=counts["pruned"],
            failed=counts["fail"],
            **({f"best_{self.metric}": f"{best:.4f}"} if best is not None else {}),
        )


def trial_counts(study: optuna.Study) -> dict[str, int]:
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    return {state.name.lower(): states.count(state) for state in TrialState}


def best_value(study: optuna.Study) -> float | None:
    return study.best_value if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def summarise(study: optuna.Study, job: WorkerJob, maximize: bool) -> SearchResult:
    """Log the best trial and Optuna's plots to the parent run and register the best model as the champion."""
    counts = trial_counts(study)
    run_id = job.parent_run_id
    tracking.log_summary(run_id, {f"n_{state}": count for state, count in counts.items() if count}, {}, {})
    if best_value(study) is None:
        return SearchResult(job.study_name, job.metric, None, {}, counts, run_id, None)
    best = study.best_trial
    tracking.log_summary(
        run_id,
        {f"best_{job.metric}": best.value},
        {f"best_{name}": value for name, value in best.params.items()},
        {"best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id", "")},
    )
    log_plots(study, run_id)
    version = None
    if best.user_attrs.get("model_uri"):
        version = tracking.register_champion(
            best.user_attrs["model_uri"],
            job.search.register_as or job.study_name,
            job.metric,
            best.value,
            maximize,
            tags={"study": job.study_name, "trial": best.number, "run_id": best.user_attrs.get("mlflow_run_id", "")},
        )
    return SearchResult(job.study_name, job.metric, best.value, best.params, counts, run_id, version)


def log_plots(study: optuna.Study, run_id: str) -> None:
    """Optuna's matplotlib plots as `optuna/<name>.png`; a plot the study cannot support yet is skipped."""
    for name, plot in PLOTS.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            tqdm.write(f"search: no {name} plot yet ({error})", file=sys.stderr)
            continue
        figure = np.ravel(axes)[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        tracking.log_figure(run_id, figure, f"optuna/{name}.png")
        plt.close(figure)
