"""fit / `classifier train` on tiny prepared datasets: learning, tracking, resume, freezing, bad input."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import free_port, written
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import TrainConfig
from classifier.data.dataset import CachedImages, load_split
from classifier.data.layout import read_manifest
from classifier.errors import UserError
from classifier.learn.device import memory_format
from classifier.learn.inference import predict_split
from classifier.learn.train import EpochScheduler, fit, make_loader, make_optimizer
from classifier.measure.threshold import choose_threshold
from classifier.model.pyfunc import load_classifier
from classifier.nets.models import create_model, head_and_backbone


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("three"), {"red": 20, "green": 20, "blue": 20})


@pytest.fixture(scope="module")
def grey_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("grey"), {"benign": 20, "malignant": 20}, mode="L")


def quick(tmp_path: Path, **options) -> TrainConfig:
    values = dict(epochs=2, batch_size=8, lr=3e-3, augment="none", system_metrics=False, num_workers=0)
    return TrainConfig(**{**values, "output_dir": tmp_path / "outputs", **options})


def test_fit_learns_tiny_data_and_tracks_everything(three_classes: Path, tmp_path: Path) -> None:
    result = fit(quick(tmp_path, epochs=3), three_classes, run_name="tiny")

    assert result.monitor == "val_macro_f1"
    assert result.best_metrics["val_accuracy"] >= 0.7  # chance is 1/3
    assert result.epochs_run == 3 and result.checkpoint.is_file() and result.model_uri
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["model"] == "simple_cnn" and run.data.params["epochs"] == "3"
    expected = {"train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_roc_auc"}
    expected |= {"val_pr_auc", "val_recall_red", "val_recall_green", "val_recall_blue", "lr"}
    assert expected <= set(run.data.metrics)
    assert len(mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")) == 3
    artifacts = {
        item.path
        for folder in ("evaluation", "checkpoints", "config")
        for item in mlflow.MlflowClient().list_artifacts(result.run_id, folder)
    }
    reports = {"confusion_matrix.png", "confusion_matrix_normalised.png", "roc_curve.png", "pr_curve.png"}
    reports |= {"learning_curves.png", "classification_report.txt", "classification_report.json"}
    assert {f"evaluation/{name}" for name in reports} <= artifacts
    assert not [path for path in artifacts if path.startswith("checkpoints/")]  # one copy of the weights: the model
    (model,) = mlflow.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'", output_format="list"
    )
    assert model.metrics and {metric.key for metric in model.metrics} >= {"best_val_macro_f1", "best_epoch"}
    logged_config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{result.run_id}/config/train.yaml"))
    assert logged_config["epochs"] == 3 and logged_config["augment"] == "none"
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert checkpoint["classes"] == ["blue", "green", "red"]
    assert checkpoint["preprocessing"]["size"] == 16 and checkpoint["in_chans"] == 3
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.source_run_id == result.run_id  # the UI's Models view ranks models by their best validation scores
    linked = {metric.key: metric.value for metric in model.metrics}
    assert linked["best_val_macro_f1"] == pytest.approx(result.best_metrics["val_macro_f1"])
    # the per-epoch scores it shows are those of the epoch whose weights it holds, not of the first epoch
    assert result.best_epoch > 1
    assert {metric.step for metric in model.metrics if metric.key == "val_loss"} == {result.best_epoch - 1}
    assert linked["val_loss"] == pytest.approx(result.best_metrics["val_loss"])


def test_a_model_trained_with_tta_has_its_threshold_tuned_on_the_probabilities_it_predicts(
    grey_pair: Path, tmp_path: Path
) -> None:
    result = fit(quick(tmp_path, augment="light", tta=True), grey_pair)

    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert checkpoint["tta"] is True
    validation = load_split(grey_pair, "validation")
    labels, averaged = predict_split(checkpoint, validation, 64, torch.device("cpu"), tta=True)
    _, plain = predict_split(checkpoint, validation, 64, torch.device("cpu"), tta=False)
    assert not np.allclose(averaged, plain)  # the flips change what the model says
    assert checkpoint["threshold"] == pytest.approx(choose_threshold(labels == 1, averaged[:, 1], "youden"))
    assert load_classifier(result.model_uri).tta  # predict and serve average the same views unless told not to
    assert not load_classifier(result.model_uri, tta=False).tta


def test_killed_run_resumes_in_the_same_run_and_ends_as_if_never_stopped(grey_pair: Path, tmp_path: Path) -> None:
    config = quick(tmp_path, epochs=3, scheduler="cosine", warmup_epochs=1)
    uninterrupted = fit(config, grey_pair, log_model=False)

    def kill_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    other = quick(tmp_path, epochs=3, scheduler="cosine", warmup_epochs=1, experiment="again")
    with pytest.raises(KeyboardInterrupt):
        fit(other, grey_pair, on_epoch_end=kill_after_first_epoch, log_model=False)
    killed = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("again").experiment_id])[0]
    assert killed.info.status == "KILLED"

    resumed = fit(other, grey_pair, log_model=False)  # the same command again

    assert resumed.run_id == killed.info.run_id
    assert mlflow.MlflowClient().get_run(resumed.run_id).info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(resumed.run_id, "val_loss")
    assert sorted(metric.step for metric in history) == [0, 1, 2]
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert resumed.best_metrics == uninterrupted.best_metrics
    final = [
        torch.load(result.checkpoint.with_name("last.pt"), weights_only=True) for result in (uninterrupted, resumed)
    ]
    for name, tensor in final[0]["state_dict"].items():
        assert torch.equal(tensor, final[1]["state_dict"][name]), name


def test_a_run_killed_on_one_machine_resumes_on_another_from_its_uploaded_checkpoints(
    grey_pair: Path, tmp_path: Path
) -> None:
    def kill_after_second_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    first_machine = quick(tmp_path / "a", epochs=3, checkpoint_upload_minutes=1e-9)  # uploads after every epoch
    with pytest.raises(KeyboardInterrupt):
        fit(first_machine, grey_pair, on_epoch_end=kill_after_second_epoch, log_model=False)
    (killed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    stored = {item.path for item in mlflow.MlflowClient().list_artifacts(killed.info.run_id, "checkpoints")}
    assert stored == {"checkpoints/best.pt", "checkpoints/last.pt"}
    shutil.rmtree(tmp_path / "a")  # the first machine is gone

    resumed = fit(quick(tmp_path / "b", resume=killed.info.run_id), grey_pair, log_model=False)

    assert resumed.run_id == killed.info.run_id and resumed.checkpoint.is_relative_to(tmp_path / "b")
    assert mlflow.MlflowClient().get_run(resumed.run_id).info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(resumed.run_id, "val_loss")
    assert sorted(metric.step for metric in history) == [0, 1, 2]  # the third epoch only, on the second machine
    stored = {item.path for item in mlflow.MlflowClient().list_artifacts(resumed.run_id, "checkpoints")}
    assert stored == {"checkpoints/best.pt"}  # finished: the resume state is no longer kept


def by_step(metric: mlflow.entities.Metric) -> int:
    return metric.step


def test_frozen_backbone_gets_no_updates_then_trains_with_a_lower_lr(grey_pair: Path, tmp_path: Path) -> None:
    initial = create_model("simple_cnn", 2, 1)
    weights = tmp_path / "initial.pt"
    torch.save(initial.state_dict(), weights)
    config = quick(tmp_path, epochs=2, freeze_epochs=1, backbone_lr_scale=0.1, weights=weights, scheduler="none")
    stages = []

    def snapshot(epoch: int, metrics: dict[str, float]) -> None:
        run_folder = next(path for path in (tmp_path / "outputs").iterdir() if path.is_dir())  # beside: its lock
        stages.append(torch.load(run_folder / "last.pt", weights_only=True))

    fit(config, grey_pair, on_epoch_end=snapshot, log_model=False)

    head, backbone = head_and_backbone(initial)
    names = {id(parameter): name for name, parameter in initial.named_parameters()}
    start = initial.state_dict()
    for parameter in backbone:
        assert torch.equal(stages[0]["state_dict"][names[id(parameter)]], start[names[id(parameter)]])
        assert not torch.equal(stages[1]["state_dict"][names[id(parameter)]], start[names[id(parameter)]])
    for parameter in head:
        assert not torch.equal(stages[0]["state_dict"][names[id(parameter)]], start[names[id(parameter)]])
    # nor the BatchNorm statistics: running means and variances stay those the backbone came with, then move
    head_names = {names[id(parameter)] for parameter in head}
    statistics = [key for key in start if key not in head_names and "running_" in key]
    assert statistics and set(stages[0]["state_dict"]) == set(start)
    for key in statistics:
        assert torch.equal(stages[0]["state_dict"][key], start[key]), key
    assert all(not torch.equal(stages[1]["state_dict"][key], start[key]) for key in statistics)
    head_group, backbone_group = stages[1]["optimizer"]["param_groups"]
    assert backbone_group["lr"] == pytest.approx(head_group["lr"] * 0.1)


def test_pretrained_efficientnet_lite0_fine_tunes_offline(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 20, "malignant": 20}, size=64, mode="L")
    config = quick(tmp_path, model="efficientnet_lite0", pretrained=True, epochs=2, freeze_epochs=1, lr=1e-2)
    config.channels_last = True

    result = fit(config, data, log_model=False)

    # the frozen pretrained features alone separate the classes, and fine-tuning them all separates them better
    # (train_loss is no measure here: the first unfrozen epoch switches BatchNorm to batches of 8)
    logged = mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")
    history = [metric.value for metric in sorted(logged, key=by_step)]
    assert history[0] < np.log(2) and history[-1] < history[0]
    assert result.best_metrics["val_accuracy"] > 0.5


@pytest.mark.parametrize("resident", [True, False])
def test_weighted_sampler_balances_batches(tmp_path: Path, resident: bool) -> None:
    root = prepared_dataset(tmp_path, {"common": 36, "rare": 6})
    training = CachedImages(load_split(root, "training"))
    config = quick(tmp_path, sampler="weighted", batch_size=1000)
    loader = make_loader(training, config, torch.device("cpu"), torch.Generator().manual_seed(0), True, resident)

    drawn = np.concatenate([labels.numpy() for _ in range(20) for _, labels in loader])
    assert np.bincount(training.labels).min() < len(training) / 4
    assert abs(drawn.mean() - 0.5) < 0.05


def test_cli_merges_yaml_and_command_line(grey_pair: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "experiment.yaml"
    yaml_file.write_text("train:\n  epochs: 3\n  lr: 0.005\n  augment: none\n  system_metrics: false\n")
    output = tmp_path / "outputs"

    result = CliRunner().invoke(
        main, ["train", str(grey_pair), "--config", str(yaml_file), "--epochs", "1", "--output-dir", str(output)]
    )

    assert result.exit_code == 0, result.output
    run_id = re.search(r"^run ([0-9a-f]{32}):", result.stdout, re.MULTILINE).group(1)
    params = mlflow.MlflowClient().get_run(run_id).data.params
    assert (params["epochs"], params["lr"], params["augment"]) == ("1", "0.005", "none")
    assert not (output / run_id).exists()  # all of it is in MLflow now
    kept = CliRunner().invoke(
        main, ["train", str(grey_pair), "--config", str(yaml_file), "--output-dir", str(output), "--keep-outputs"]
    )
    kept_id = re.search(r"^run ([0-9a-f]{32}):", kept.stdout, re.MULTILINE).group(1)
    assert (output / kept_id / "best.pt").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "resnet81"], "did you mean"),
        (["--batch-size", "0"], "'batch_size' must be >= 1"),
        (["--lr", "-1"], "'lr' must be > 0"),
        (["--weights", "missing.pt"], "weights file missing.pt does not exist"),
        (["--monitor", "val_bogus"], "val_bogus: not a metric training logs on this data; use one of train_loss,"),
    ],
)
def test_bad_options_fail_with_one_line_and_nothing_logged(grey_pair: Path, arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["train", str(grey_pair), *arguments])

    assert result.exit_code == 1 and message in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_folder_that_is_not_prepared_is_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", str(tmp_path)])

    assert result.exit_code == 1 and "not a prepared dataset" in result.output


def test_out_of_memory_says_to_lower_the_batch_size(
    grey_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("classifier.nets.models.SimpleCNN.forward", exhausted)

    with pytest.raises(UserError, match="at batch size 8; lower --batch-size"):
        fit(quick(tmp_path), grey_pair)


def test_unreachable_tracking_server_fails_within_ten_seconds(
    grey_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()

    result = CliRunner().invoke(main, ["train", str(grey_pair), "--output-dir", str(tmp_path)])

    assert time.monotonic() - started < 10
    assert result.exit_code == 1 and "tracking server unreachable" in result.output
    assert written(tmp_path) == []


@pytest.mark.slow
def test_early_stopping_ends_the_run_after_patience_epochs_without_gain(grey_pair: Path, tmp_path: Path) -> None:
    config = quick(tmp_path, epochs=5, lr=1e-12, monitor="accuracy", patience=1)

    result = fit(config, grey_pair, log_model=False)

    assert (result.epochs_run, result.monitor) == (2, "val_accuracy")  # a tie on accuracy is no gain
    # ... but it keeps the epoch of lower validation loss (the later one when that ties too), counted from 1
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")
    losses = [metric.value for metric in sorted(history, key=lambda metric: metric.step)]
    assert result.best_epoch == (2 if losses[1] <= losses[0] else 1)


def test_a_compiled_network_trains_and_its_checkpoint_loads_into_a_plain_one(
    grey_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = []
    compile_in_place = torch.nn.Module.compile

    def traced_only(module: torch.nn.Module, **options) -> None:  # TorchDynamo without inductor's minute of codegen
        compiled.append(type(module).__name__)
        compile_in_place(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", traced_only)
    result = fit(quick(tmp_path, compile=True, epochs=1, ema_decay=0.9), grey_pair, log_model=False)

    assert compiled == ["SimpleCNN"]

    checkpoint = torch.load(result.checkpoint, weights_only=True)
    plain = create_model("simple_cnn", 2, 1)
    plain.load_state_dict(checkpoint["state_dict"])  # the same keys: compiled in place, nothing prefixed
    assert np.isfinite(result.best_metrics["val_loss"])


def test_channels_last_is_the_default_on_cuda_only_and_an_explicit_choice_wins() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory_format(None, cuda) == torch.channels_last and memory_format(None, cpu) == torch.contiguous_format
    assert memory_format(False, cuda) == torch.contiguous_format and memory_format(True, cpu) == torch.channels_last


def test_schedule_warms_up_then_follows_the_cosine() -> None:
    model = create_model("simple_cnn", 2, 1)
    config = TrainConfig(epochs=5, lr=0.1, warmup_epochs=2, scheduler="cosine")
    optimizer = make_optimizer(model, config)
    schedule = EpochScheduler(optimizer, config, maximise=True)

    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        schedule.step(0.0)

    assert rates[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert rates[2] > rates[3] > rates[4] > 0


def test_memory_mapped_cache_holds_the_same_pixels(grey_pair: Path, tmp_path: Path, isolated_cache: Path) -> None:
    copy = tmp_path / "prepared"
    shutil.copytree(grey_pair, copy)

    in_memory = load_split(copy, "training", cache="memory")
    mapped = load_split(copy, "training", cache="memmap")

    assert isinstance(mapped.images, np.memmap) and list(isolated_cache.glob("*/training-*.npy"))
    assert np.array_equal(np.asarray(mapped.images), in_memory.images)
    assert np.array_equal(mapped.labels, in_memory.labels)


@pytest.mark.slow
def test_terminated_command_continues_when_run_again(grey_pair: Path, tmp_path: Path) -> None:
    output = tmp_path / "outputs"
    command = [str(Path(sys.executable).with_name("classifier")), "train", str(grey_pair), "--epochs", "3"]
    command += ["--batch-size", "8", "--augment", "none", "--system-metrics", "false", "--output-dir", str(output)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while not list(output.glob("*/last.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    (killed_id,) = [folder.name for folder in output.iterdir()]
    assert mlflow.MlflowClient().get_run(killed_id).info.status == "KILLED"

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming run {killed_id}" in again.stderr and f"run {killed_id}:" in again.stdout
    assert mlflow.MlflowClient().get_run(killed_id).info.status == "FINISHED"
    steps = [metric.step for metric in mlflow.MlflowClient().get_metric_history(killed_id, "val_loss")]
    assert sorted(steps) == list(range(3))


def test_binary_model_keeps_the_validation_threshold_reaching_the_target_recall(
    grey_pair: Path, tmp_path: Path
) -> None:
    result = fit(quick(tmp_path, threshold_rule="recall:1.0"), grey_pair, log_model=False)

    threshold = torch.load(result.checkpoint, weights_only=True)["threshold"]
    validation = read_manifest(grey_pair).query("split == 'validation'")
    scores = load_classifier(str(result.checkpoint)).predict([str(grey_pair / path) for path in validation["path"]])
    positive = (validation["label"] == "malignant").to_numpy()
    assert threshold == pytest.approx(choose_threshold(positive, scores["prob_malignant"], "recall:1.0"))
    assert (scores["prob_malignant"][positive] >= threshold).all()  # every malignant validation image is caught
    logged = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert logged["decision_threshold"] == pytest.approx(threshold)
    assert logged["val_prevalence"] == pytest.approx(positive.mean())  # the mix of patients it was tuned on
    assert "malignant if prob_malignant >= threshold" in load_classifier(str(result.checkpoint)).rule
    assert "recall 1 on validation, " in load_classifier(str(result.checkpoint)).rule


def test_a_bf16_or_cpu_run_resumes_where_the_loss_scaler_is_on() -> None:
    from classifier.learn.train import load_scaler_state

    off = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # what a bf16 or CPU run's last.pt holds
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    with pytest.raises(RuntimeError):
        fp16.load_state_dict(off)  # what resuming did before
    load_scaler_state(fp16, off)
    assert fp16.get_scale() == 8.0  # starts afresh
    load_scaler_state(fp16, torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0).state_dict())
    assert fp16.get_scale() == 2.0  # an fp16 run's scale continues
