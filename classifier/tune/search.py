"""Optuna study over `fit`: each trial a nested MLflow run, pruned on the per-epoch validation metric, N workers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
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

from classifier import console, processes, stopping, tracking
from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.data.layout import read_info
from classifier.errors import UserError
from classifier.learn.train import check_metric, discard_outputs, epoch_metric_names, fit, resolve_monitor
from classifier.tune.budget import EPOCHS_ATTR, budget_epochs
from classifier.tune.refit import FOLD_EPOCHS_ATTR, FOLD_RUNS_ATTR, refit_folds, refit_full
from classifier.tune.space import parse_space, read_enqueued, suggest
from classifier.tune.storage import open_storage

# Trials that count towards --n-trials: a failed trial does not. A WAITING one (a dead worker's trial to retry, an
# enqueued configuration) counts once it runs: counted before, it would stop the study before it runs.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
STUDY_TAG, TRIAL_TAG, LAUNCHER_TAG = "optuna_study", "optuna_trial", "classifier.launcher"
# Trial user attrs: the worker process running it (host, pid, start time); its MLflow run; the run a retry continues;
# why a dead worker's trial failed; why a trial's configuration failed (as its run's tag classifier.failure says).
WORKER_ATTR, RUN_ATTR, RESUME_ATTR, FAIL_ATTR = "worker", "mlflow_run_id", "resume_run_id", "fail_reason"
FAILURE_ATTR, SKIPPED_ATTR = "failure", "skipped"
FAILURES_BEFORE_STOP = 3  # the study's first trials all failing this often: a bug or a broken dataset, not a config
PLOTS_EVERY = 5  # finished trials between refreshes of the parent run's Optuna plots
REFIT_SHARE = 0.1  # of a --budget, kept for the champion: fold ensemble, registration, plots
MAX_REPLACED = 100  # killed workers replaced in a study without a trial limit
POLL_S = 1.0  # how often the launcher and its workers look at each other
AUTO_THREADS = 2  # CPU threads per worker of `--n-workers auto` without GPUs
FORCE_GRACE_S = 10.0  # after a second stop signal, how long workers get before they are killed
PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values,
}
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The parallel-coordinate plot of a parameter sampled at one value so far: matplotlib widens the axis itself.
warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims", category=UserWarning)


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
    trials_end: float | None = None  # time.time() by which trials stop (a --budget's share for them)
    environ: dict[str, str] = field(default_factory=dict)  # the launcher's, as it starts the worker


def search(config: SearchConfig, train: TrainConfig, data: Path) -> SearchResult:
    """Run (or resume, or join) the study until it holds `config.trial_limit` trials or the trials' share of
    `config.budget` is spent, then build the champion (the best trial's model, or its fold models as one ensemble)
    and register it."""
    started = time.time()
    config = dataclasses.replace(config, n_workers=worker_count(config))
    info = read_info(data)
    # the same names as fit's --monitor
    metric = resolve_monitor(config.objective, len(info.classes), info.task == "multi_label")
    check_metric(metric, epoch_metric_names(info, train), "search: --objective")
    maximize = not metric.endswith("loss")
    tunable = [field.name for field in dataclasses.fields(TrainConfig)]
    distributions = parse_space(config.space, tunable)
    enqueued = read_enqueued(config.enqueue, distributions) if config.enqueue else []
    if config.cv_folds and (info.folds or 0) < config.cv_folds:
        raise UserError(
            f"search: cv_folds={config.cv_folds} needs a dataset prepared with `--folds {config.cv_folds}` or more; "
            f"{data} has {info.folds or 'no'} folds"
        )
    if config.n_workers > 1 and (config.storage or "").startswith("sqlite"):
        raise UserError("--storage sqlite:// does not support parallel workers; use the default journal or postgresql")
    # the fork server imports the training code while this launcher sets the study up
    context = worker_context() if config.n_workers > 1 else None
    if config.n_workers > 1 and train.cache == "auto":
        train = dataclasses.replace(train, cache="memmap")  # one decode, every worker reading one memory map
    study_name = config.study_name or f"search-{Path(data).resolve().name}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking.connect()
    handler = stale_trial_handler(train.experiment, config)
    study = open_study(config, study_name, metric, maximize, handler)
    # system metrics once, on the parent run (the machine, all its workers), not per trial: a trial's end would wait on
    # its own monitor thread
    parent = tracking.start_run(
        train.experiment, f"search {study_name}", tags={STUDY_TAG: study_name}, system_metrics=train.system_metrics
    )
    with parent as run:
        parent_run_id = run.info.run_id
        os.environ["MLFLOW_EXPERIMENT_ID"] = run.info.experiment_id
        launcher = json.dumps(processes.identity())  # lets the next launcher end this run should this process die
        tags = {STUDY_TAG: study_name, "search_metric": metric, LAUNCHER_TAG: launcher}
        tracking.log_summary(parent_run_id, {}, {}, tags)
        end_dead_launchers(run.info.experiment_id, study_name)
        optuna.storages.fail_stale_trials(study)
        fail_dead_trials(study, handler)
        for params in enqueued:  # once: a resumed or joined study already holds them
            study.enqueue_trial(params, skip_if_exists=True)
        trials_end = None if config.budget is None else started + config.budget_seconds * (1 - REFIT_SHARE)
        if trials_end is not None and config.fit_epochs_to_budget and "epochs" not in distributions:
            epochs = budget_epochs(study, config, train, data, trials_end - time.time())
            train = dataclasses.replace(train, epochs=epochs)
            tracking.log_summary(parent_run_id, {}, {EPOCHS_ATTR: epochs}, {})
        job = WorkerJob(Path(data).resolve(), train, config, study_name, metric, parent_run_id, trials_end=trials_end)
        if trials_to_run(study, config.trial_limit) and not budget_spent(job):
            with Progress(study, config.trial_limit, metric):
                run_workers(job, study, handler, context)
        return summarise(study, job, maximize)


def budget_spent(job: WorkerJob) -> bool:
    """Whether the trials' share of the search's --budget is used up."""
    return job.trials_end is not None and time.time() >= job.trials_end


def end_dead_launchers(experiment_id: str, study_name: str) -> None:
    """End the search runs of `study_name` left RUNNING by a launcher of this host that died (SIGKILL)."""
    for run_id, tags in tracking.running_runs(experiment_id, {STUDY_TAG: study_name}):
        launcher = json.loads(tags.get(LAUNCHER_TAG) or "null")
        if launcher and processes.is_gone(launcher):
            tracking.end_runs([run_id], f"its launcher ({processes.describe(launcher)}) died")


def trials_ahead(study: optuna.Study, number: int) -> int:
    """How many trials created before trial `number` are done, running or waiting to run (a retry)."""
    states = (*COUNTED_STATES, TrialState.WAITING)
    return sum(trial.number < number for trial in study.get_trials(deepcopy=False, states=states))


class StudyFull(Exception):
    """A trial that would take the study past its --n-trials: workers claimed the last ones meanwhile."""


class SkippedTrials(logging.Filter):
    """Drop Optuna's failure warnings (and traceback) for trials skipped as StudyFull: they are not failures."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {number} failed") for number in self.numbers)


SKIPPED = SkippedTrials()
logging.getLogger("optuna.study._optimize").addFilter(SKIPPED)


def trials_to_run(study: optuna.Study, n_trials: int | None) -> bool:
    """Whether the study holds fewer than `n_trials` trials done or running (a waiting retry runs first); always,
    without a limit (a budget ends the study)."""
    return n_trials is None or len(study.get_trials(deepcopy=False, states=COUNTED_STATES)) < n_trials


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
            "use the same --objective or another --study-name"
        )
    study.set_user_attr("metric", metric)
    return study


def stale_trial_handler(experiment: str, config: SearchConfig) -> Any:
    """For a failed trial whose worker died (or was stopped): end its orphan MLflow runs as FAILED with the reason,
    then queue a retry with the same parameters that continues the trial's last checkpoint (up to `max_retry`)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=config.max_retry)

    def handle(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str | None = None) -> None:
        reason = reason or f"trial {trial.number}: its worker sent no heartbeat (died or lost)"
        experiment_id = tracking.experiment_id(experiment)
        tags = {STUDY_TAG: study.study_name, TRIAL_TAG: str(trial.number)}
        tracking.end_orphan_runs(experiment_id, tags, reason)
        trial.set_user_attr("retry_of", trial.user_attrs.get("retry_of", trial.number))
        trial.set_user_attr(RESUME_ATTR, trial.user_attrs.get(RUN_ATTR) or trial.user_attrs.get(RESUME_ATTR))
        for name in (WORKER_ATTR, RUN_ATTR, FAIL_ATTR):  # the retry runs in another worker, in a run of its own
            trial.set_user_attr(name, None)
        retry(study, trial)

    return handle


def fail_dead_trials(study: optuna.Study, handler: Any) -> list[int]:
    """Fail the RUNNING trials of this host whose worker process is gone (SIGKILL, the OOM killer), end their runs
    and retry them with `handler`: the journal storage has no heartbeat. Other hosts' trials are left to the
    heartbeats of a database storage. Returns the numbers of the trials failed here."""
    storage = study._storage  # as optuna.storages.fail_stale_trials does: the storage API takes trial ids
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not worker or not processes.is_gone(worker):
            continue
        reason = f"trial {trial.number}: its worker ({processes.describe(worker)}) died"
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_ATTR, reason)
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first, and retries it
        tqdm.write(f"search: {reason}; its run ends FAILED and the trial is retried", file=sys.stderr)
        handler(study, copy.deepcopy(storage.get_trial(trial._trial_id)), reason)
        failed.append(trial.number)
    return failed


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(index) for index in range(torch.cuda.device_count())]


def worker_count(config: SearchConfig) -> int:
    """`n_workers`; `auto`: one per visible GPU, else one per `threads_per_worker` (default 2) of this process's
    cores."""
    if config.n_workers != "auto":
        return int(config.n_workers)
    return len(visible_gpus()) or max(1, processes.available_cores() // (config.threads_per_worker or AUTO_THREADS))


def run_workers(
    job: WorkerJob, study: optuna.Study, handler: Any, context: multiprocessing.context.BaseContext | None
) -> None:
    """Run the study in this process without a `context`, else in `job.search.n_workers` processes of it (see
    worker_context), one GPU each when there are GPUs.

    The launcher watches its workers: one killed by a signal it did not send (the OOM killer, `kill -9`) has its trial
    failed and retried, and is replaced while the study has trials to run. A stop request (Ctrl-C, SIGTERM; see
    classifier.stopping) reaches each worker once, as a shared flag rather than a second signal (a terminal's Ctrl-C has
    reached them all already); a second request kills the workers still running after FORCE_GRACE_S. Either way
    their trials end failed and retried on the next run, and no run is left RUNNING."""
    if context is None:
        work(job)
        return
    gpus = visible_gpus()
    # A lock-free shared flag, not an Event: a worker killed while waiting on an Event's lock would leave every later
    # set() or is_set() of the launcher waiting for good.
    stop = context.Value("b", 0, lock=False)

    def start(index: int) -> multiprocessing.process.BaseProcess:
        device = gpus[index % len(gpus)] if gpus else None
        process = context.Process(
            target=work_in_subprocess,
            args=(dataclasses.replace(job, index=index, device=device, environ=dict(os.environ)), stop),
            name=f"search-worker-{index}",
        )
        with ctrl_c_ignored():  # a spawned worker (no fork server) inherits it
            process.start()
        return process

    active = {index: start(index) for index in range(job.search.n_workers)}
    ended: list[multiprocessing.process.BaseProcess] = []
    replaced = 0
    try:
        while active:
            multiprocessing.connection.wait([process.sentinel for process in active.values()], timeout=POLL_S)
            if stopping.requested():
                stop.value = 1
            for index, process in list(active.items()):
                if process.is_alive():
                    continue
                process.join()
                ended.append(active.pop(index))
                if process.exitcode >= 0 or stop.value:
                    continue
                fail_dead_trials(study, handler)  # killed by a signal nobody here sent
                limit = job.search.trial_limit
                if replaced < (limit or MAX_REPLACED) and trials_to_run(study, limit) and not budget_spent(job):
                    cause = signal.Signals(-process.exitcode).name
                    tqdm.write(f"search: {process.name} was killed ({cause}); starting another", file=sys.stderr)
                    active[index] = start(index)
                    replaced += 1
    except KeyboardInterrupt:  # a second stop request: stop now
        stop.value = 1
        deadline = time.monotonic() + FORCE_GRACE_S
        for process in active.values():
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in active.values():
            if process.is_alive():
                process.kill()
            process.join()
        fail_dead_trials(study, handler)
        raise
    fail_dead_trials(study, handler)
    if stop.value:
        raise stopping.Interrupted(stopping.requested() or "stop requested")
    # killed workers failed the study only when it stays short
    unfinished = trials_to_run(study, job.search.trial_limit) and not budget_spent(job)
    failed = [
        f"{process.name} ({_exit_cause(process.exitcode)})"
        for process in ended
        if process.exitcode > 0 or (process.exitcode < 0 and unfinished)
    ]
    if failed:
        raise UserError(f"search: {', '.join(failed)} failed (see the errors above); rerun the command to resume")


def worker_context() -> multiprocessing.context.BaseContext:
    """Where workers come from: forked from a server process that imported this module once, started here (a spawned
    worker would import torch, timm and mlflow itself, several seconds each, on cores its siblings share). The server
    starts with Ctrl-C ignored, which the workers it forks inherit."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ctrl_c_ignored():
        multiprocessing.forkserver.ensure_running()
    return context


@contextlib.contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """Ctrl-C ignored meanwhile, so that a process started now ignores it until it installs its own handler
    (work_in_subprocess: a Ctrl-C meanwhile reaches it through the launcher's stop flag)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_cause(exitcode: int) -> str:
    return f"killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit status {exitcode}"


def work(job: WorkerJob) -> None:
    """One worker: claim trials of the study until it holds `n_trials` (counting every worker's trials).

    At its start and after each trial it fails the trials of dead workers on this host (see fail_dead_trials), and it
    stops starting trials once a stop is requested."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    if job.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.device
    share = max(1, processes.available_cores() // job.search.n_workers)  # GPU workers' loaders share the cores too
    torch.set_num_threads(job.search.threads_per_worker or share)
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

    def between_trials(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        fail_dead_trials(study, handler)
        if stopping.requested():
            study.stop()

    fail_dead_trials(study, handler)
    stopping.check()
    limit = job.search.trial_limit
    if not trials_to_run(study, limit):
        return  # a replacement worker that started after the last trials were claimed
    timeout = job.search.timeout
    if job.trials_end is not None:
        timeout = min(timeout or math.inf, max(0.0, job.trials_end - time.time()))
    study.optimize(
        Objective(job, distributions, handler),
        n_trials=limit,
        timeout=timeout,
        callbacks=[
            between_trials,
            *([MaxTrialsCallback(limit, states=COUNTED_STATES)] if limit else []),
            AfterFailure(),
            *([PlotRefresh(job)] if not job.index else []),
        ],
        catch=(Exception,),  # a configuration that fails (out of memory, a model that refuses the image size) is FAILED
    )


class AfterFailure:
    """After a FAILED trial: free the accelerator memory it held, and stop the search, with one line saying why, when
    the study's first `limit` trials have all failed (a bug or a broken dataset rather than a bad configuration)."""

    def __init__(self, limit: int = FAILURES_BEFORE_STOP) -> None:
        self.limit = limit

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            return
        gc.collect()  # the failed trial's tensors, now that Optuna has let go of its exception
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trials = study.get_trials(deepcopy=False)
        if any(other.state in (TrialState.COMPLETE, TrialState.PRUNED) for other in trials):
            return
        failed = [other for other in trials if FAILURE_ATTR in other.user_attrs]
        if len(failed) >= self.limit:
            raise UserError(
                f"search: the first {len(failed)} trials all failed, the last with {trial.user_attrs.get(FAILURE_ATTR)}"
                " (see its MLflow run); fix the cause and rerun to resume"
            )


class PlotRefresh:
    """Redraw the parent run's Optuna plots every `every` finished trials, so that the study can be watched in the
    MLflow UI while it runs (one worker does it, in its main thread, between trials)."""

    def __init__(self, job: WorkerJob, every: int = PLOTS_EVERY) -> None:
        self.run_id, self.every, self.drawn_at = job.parent_run_id, every, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        finished = len(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        )
        if finished >= self.drawn_at + self.every:
            log_plots(study, self.run_id, say_missing=False)
            self.drawn_at = finished


def work_in_subprocess(job: WorkerJob, stop: Any) -> None:
    """`work` in a worker process (see worker_context). It stops (between batches, then trials) on its own Ctrl-C or
    SIGTERM, when the launcher sets `stop`, or when the launcher is gone; then it exits 130 (its trial failed and
    retried, its run KILLED)."""
    os.environ.clear()  # the launcher's environment now, not the server's from when it started
    os.environ.update(job.environ)
    os.environ[console.BARS] = "0"  # one progress line for the study (the launcher's): workers' bars would interleave
    launcher = os.getppid()  # the fork server, which exits with the launcher

    def watch() -> None:
        while not stop.value:
            time.sleep(POLL_S)
            if os.getppid() != launcher:
                stopping.request("the launcher is gone")
                return
        stopping.request("the launcher stops the study")

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()
    try:
        with stopping.on_signals(note="stopping this worker's trial after its current batch"):
            work(job)
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as error:
        print(f"Error: {error.message}", file=sys.stderr)
        sys.exit(1)


def make_sampler(job: WorkerJob) -> optuna.samplers.BaseSampler:
    """TPE (default), a Gaussian process or random, seeded differently per worker so that workers do not propose the
    same points. TPE's constant liar treats the trials other workers are running as bad, so they spread out."""
    seed = job.search.seed + job.index
    if job.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if job.search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=job.search.startup_trials)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=job.search.startup_trials, constant_liar=True)


def make_pruner(job: WorkerJob) -> optuna.pruners.BasePruner:
    """Median or Hyperband pruning on the per-epoch validation metric (one step per epoch), or none."""
    if job.search.pruner_name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=job.search.startup_trials, n_warmup_steps=job.search.prune_warmup_epochs
        )
    if job.search.pruner_name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, job.search.prune_warmup_epochs),
            max_resource=job.train.epochs * (job.search.cv_folds or 1),  # cross-validation reports fold after fold
        )
    return optuna.pruners.NopPruner()


def trial_config(job: WorkerJob, params: dict[str, Any], number: int) -> TrainConfig:
    """The training config of trial `number`: the search's, with the trial's sampled `params`."""
    fixed = {**dataclasses.asdict(job.train), "monitor": job.metric, "system_metrics": False}
    return build_config(TrainConfig, fixed, params, origin=f"trial {number}")


class Objective:
    """Train one sampled configuration with `fit`, reporting each epoch's validation metric to the pruner."""

    def __init__(self, job: WorkerJob, distributions: dict[str, BaseDistribution], handler: Any = None) -> None:
        self.job = job
        self.distributions = distributions
        self.handler = handler
        self.trial_runs: set[str] = set()  # the training runs of the trial in hand (one, or one per fold)

    def __call__(self, trial: optuna.Trial) -> float:
        self.skip_if_full(trial)
        trial.set_user_attr(WORKER_ATTR, processes.identity())  # how others tell that this worker died
        self.trial_runs = set()
        try:
            params = suggest(trial, self.distributions)
            config = trial_config(self.job, params, trial.number)
            tags = {STUDY_TAG: self.job.study_name, TRIAL_TAG: str(trial.number)}
            if "retry_of" in trial.user_attrs:
                tags["optuna_retry_of"] = str(trial.user_attrs["retry_of"])
            if self.job.search.cv_folds:
                score = self.cross_validate(trial, config, tags, params)
            else:
                score = self.train(trial, config, tags)
        except stopping.Interrupted as stopped:  # the study stops: this trial ends failed, to be continued
            if self.handler is not None:
                frozen = copy.deepcopy(trial.study._storage.get_trial(trial._trial_id))
                self.handler(trial.study, frozen, f"trial {trial.number}: stopped ({stopped})")
            raise
        except optuna.TrialPruned:
            self.discard_outputs(trial)
            raise
        except Exception as error:  # Optuna marks the trial FAILED and the worker takes the next one
            trial.set_user_attr(FAILURE_ATTR, tracking.failure_reason(error))
            raise
        self.discard_outputs(trial)
        return score

    def discard_outputs(self, trial: optuna.Trial) -> None:
        """Remove the local output folders of a trial that ended complete (its best.pt and model are logged) or
        pruned (never continued), and of the run it continued; `--keep-outputs` keeps them."""
        discard_outputs(self.job.train, self.trial_runs | ({trial.user_attrs.get(RESUME_ATTR)} - {None}))

    def skip_if_full(self, trial: optuna.Trial) -> None:
        """End this trial unrun (FAILED, user attr `skipped`) when the --n-trials trials created before it fill the
        study: workers check the count only between trials, so two can claim the last place at once (a retried
        trial makes it likely). Trial numbers decide which one runs, the same way in every worker."""
        limit = self.job.search.trial_limit
        if limit and trials_ahead(trial.study, trial.number) >= limit:
            trial.set_user_attr(SKIPPED_ATTR, True)
            SKIPPED.numbers.add(trial.number)
            raise StudyFull(f"trial {trial.number}: the study holds its {limit} trials already")

    def train(self, trial: optuna.Trial, config: TrainConfig, tags: dict[str, str]) -> float:
        """One fit, continuing the last checkpoint of the trial this one retries when it is here."""
        resumed = trial.user_attrs.get(RESUME_ATTR)
        result = fit(
            config,
            self.job.data,
            parent_run_id=self.job.parent_run_id,
            run_name=f"trial-{trial.number}",
            tags=tags,
            on_epoch_end=self.reporter(trial, record_run=True),
            warm_start=Path(config.output_dir) / resumed if resumed else None,
        )
        trial.set_user_attr(RUN_ATTR, result.run_id)
        trial.set_user_attr("best_metrics", result.best_metrics)
        if result.model_uri:
            trial.set_user_attr("model_uri", result.model_uri)
        return result.best_metrics[self.job.metric]

    def cross_validate(
        self, trial: optuna.Trial, config: TrainConfig, tags: dict[str, str], params: dict[str, Any]
    ) -> float:
        """The mean of the best metric over folds 0..k-1. Fold k reports, at step k*epochs + epoch, the mean of the
        folds so far (the finished folds' best metric and its own current one): the pruner compares fold means."""
        scores, fold_runs, fold_epochs = [], [], []
        with tracking.start_run(config.experiment, f"trial-{trial.number}", tags, self.job.parent_run_id) as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            for fold in range(self.job.search.cv_folds):
                result = fit(
                    config,
                    self.job.data,
                    parent_run_id=run.info.run_id,
                    run_name=f"trial-{trial.number}-fold-{fold}",
                    tags=tags,
                    fold=fold,
                    on_epoch_end=self.reporter(trial, offset=fold * config.epochs, finished_folds=tuple(scores)),
                    log_model=False,
                )
                scores.append(result.best_metrics[self.job.metric])
                fold_runs.append(result.run_id)
                fold_epochs.append(result.best_epoch)
            trial.set_user_attr(FOLD_RUNS_ATTR, fold_runs)
            trial.set_user_attr(FOLD_EPOCHS_ATTR, fold_epochs)
            score = float(np.mean(scores))
            tracking.log_summary(run.info.run_id, {f"cv_mean_{self.job.metric}": score}, params, {})
        return score

    def reporter(
        self, trial: optuna.Trial, offset: int = 0, record_run: bool = False, finished_folds: tuple[float, ...] = ()
    ) -> Any:
        """Report each epoch's metric to the pruner (from step `offset`), averaged with the scores of
        `finished_folds`; with `record_run`, first record the trial's MLflow run (a retry of the trial, should this
        worker die, continues that run's checkpoint)."""
        metric = self.job.metric
        recorded = not record_run

        def report(epoch: int, metrics: dict[str, float]) -> None:
            nonlocal recorded
            self.trial_runs.add(tracking.active_run_id())
            if not recorded:
                trial.set_user_attr(RUN_ATTR, tracking.active_run_id())
                recorded = True
            if metric not in metrics:
                raise UserError(f"search: metric '{metric}' is not logged by training; use one of {', '.join(metrics)}")
            value = (sum(finished_folds) + metrics[metric]) / (len(finished_folds) + 1)
            trial.report(value, offset + epoch)
            if trial.should_prune():
                folds = f" (mean of {len(finished_folds) + 1} folds)" if finished_folds else ""
                raise optuna.TrialPruned(f"{metric}={value:.4f}{folds} at epoch {epoch}")
            if budget_spent(self.job):
                raise optuna.TrialPruned(f"the search's budget is spent (epoch {epoch})")

        return report


class Progress:
    """A tqdm bar over the study's finished trials (all workers, all machines), with pruned/failed/best."""

    def __init__(self, study: optuna.Study, total: int | None, metric: str, interval_s: float = 2.0) -> None:
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
        self.bar.n = min(self.bar.total or math.inf, counts["complete"] + counts["pruned"])
        best = best_value(self.study)
        self.bar.set_postfix(
            pruned=counts["pruned"],
            failed=counts["fail"],
            **({f"best_{self.metric}": f"{best:.4f}"} if best is not None else {}),
        )


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state, with the trials skipped as StudyFull counted as `skipped` rather than `fail`."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(trial.state == state for trial in trials) for state in TrialState}
    counts["skipped"] = sum(bool(trial.user_attrs.get(SKIPPED_ATTR)) for trial in trials)
    counts["fail"] -= counts["skipped"]
    return counts


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
    model_uri = best.user_attrs.get("model_uri")
    fold_runs = best.user_attrs.get(FOLD_RUNS_ATTR)
    if job.search.refit_kind == "folds" and fold_runs:
        model_uri = refit_folds(job.data, fold_runs, job.train.experiment, run_id, best.number)
    elif job.search.refit_kind == "full" and fold_runs:
        fold_epochs = best.user_attrs.get(FOLD_EPOCHS_ATTR)
        if fold_epochs is None:
            raise UserError(
                f"search: trial {best.number} of study {job.study_name} ran before classifier recorded its folds' best"
                " epochs, which --refit full retrains for; rerun with --refit folds, or start a new --study-name"
            )
        config = trial_config(job, best.params, best.number)
        model_uri = refit_full(config, job.data, fold_runs, fold_epochs, run_id, best.number)
    if model_uri != best.user_attrs.get("model_uri"):
        tracking.log_summary(run_id, {}, {}, {"champion_model_uri": model_uri})
    if model_uri:
        version = tracking.register_champion(
            model_uri,
            job.search.register_as or job.study_name,
            job.metric,
            best.value,
            maximize,
            tags={"study": job.study_name, "trial": best.number, "run_id": best.user_attrs.get("mlflow_run_id", "")},
        )
    return SearchResult(job.study_name, job.metric, best.value, best.params, counts, run_id, version)


def log_plots(study: optuna.Study, run_id: str, say_missing: bool = True) -> None:
    """Optuna's matplotlib plots as `optuna/<name>.png`; a plot the study cannot support yet is skipped (and said)."""
    for name, plot in PLOTS.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            if say_missing:
                tqdm.write(f"search: no {name} plot yet ({error})", file=sys.stderr)
            continue
        figure = np.ravel(axes)[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        tracking.log_figure(run_id, figure, f"optuna/{name}.png")
        plt.close(figure)
