"""`classifier predict` and its MLproject entry point: files, folders and CSVs in, one CSV row per image out."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, write_class_folders

from classifier.cli import main

CLASSES = ["benign", "malignant"]
COLUMNS = ["path", "label", "confidence", "threshold", "rule", "prob_benign", "prob_malignant", "error"]


@pytest.fixture
def folder_with_a_corrupt_file(tmp_path: Path) -> Path:
    folder = write_class_folders(tmp_path / "scans", {"benign": 3, "malignant": 3})
    whole = (folder / "benign" / "benign_000.png").read_bytes()
    (folder / "malignant" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "README.txt").write_text("not an image, and not named like one")
    return folder


def run_predict(*arguments: str) -> pd.DataFrame:
    result = CliRunner().invoke(main, ["predict", *arguments, "--output", "-"])
    assert result.exit_code == 0, result.output
    return pd.read_csv(io.StringIO(result.stdout))


def test_predict_reports_a_corrupt_file_in_its_row_and_labels_the_others(checkpoint, folder_with_a_corrupt_file):
    table = run_predict(str(checkpoint), str(folder_with_a_corrupt_file), "--batch-size", "4")

    assert list(table.columns) == COLUMNS
    assert len(table) == 7  # six images and the truncated one; README.txt is no image file
    broken = table[table["path"].str.endswith("truncated.png")].iloc[0]
    assert "truncated.png" in broken["error"] and "corrupt or truncated" in broken["error"]
    assert pd.isna(broken["label"])
    readable = table.drop(index=broken.name)
    assert readable["error"].isna().all() and readable["label"].isin(CLASSES).all()
    assert (readable["prob_benign"] + readable["prob_malignant"]).round(5).eq(1).all()

    one_batch = run_predict(str(checkpoint), str(folder_with_a_corrupt_file), "--batch-size", "64")
    pd.testing.assert_frame_equal(one_batch, table)  # batching changes nothing


def test_predict_reads_image_paths_from_a_csv_relative_to_it(checkpoint, folder_with_a_corrupt_file):
    from_folder = run_predict(str(checkpoint), str(folder_with_a_corrupt_file / "benign"))
    listing = folder_with_a_corrupt_file / "listing.csv"
    names = sorted(path.name for path in (folder_with_a_corrupt_file / "benign").iterdir())
    pd.DataFrame({"path": [f"benign/{name}" for name in names], "note": "x"}).to_csv(listing, index=False)

    from_csv = run_predict(str(checkpoint), str(listing))

    assert [Path(path).name for path in from_csv["path"]] == names
    pd.testing.assert_frame_equal(from_csv.drop(columns="path"), from_folder.drop(columns="path"))


def test_predict_writes_the_csv_only_when_complete(checkpoint, folder_with_a_corrupt_file, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    result = CliRunner().invoke(main, ["predict", str(checkpoint), str(folder_with_a_corrupt_file), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(output)) == 7
    assert "1 unreadable" in result.stderr
    assert [path.name for path in output.parent.iterdir()] == ["predictions.csv"]


def test_predict_refuses_bad_arguments_in_one_line(checkpoint, tmp_path):
    listing = tmp_path / "files.csv"
    pd.DataFrame({"file": ["a.png"]}).to_csv(listing, index=False)
    cases = [
        ([str(tmp_path / "missing.pt"), str(checkpoint)], "missing.pt: no such checkpoint"),
        ([str(checkpoint), str(listing)], "files.csv: no `path` column"),
        ([str(checkpoint), str(tmp_path)], "no image files"),
    ]
    for arguments, message in cases:
        result = CliRunner().invoke(main, ["predict", *arguments])
        assert result.exit_code != 0
        assert message in result.output
        assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.slow
def test_mlproject_predict_entry_point(checkpoint, folder_with_a_corrupt_file, tmp_path):
    output = tmp_path / "predictions.csv"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "predict", "--env-manager", "local"]
    command += ["-P", f"model={checkpoint}", "-P", f"path={folder_with_a_corrupt_file}", "-P", f"output={output}"]

    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr[-3000:]
    table = pd.read_csv(output)
    assert len(table) == 7 and table["error"].notna().sum() == 1
