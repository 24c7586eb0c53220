"""`classifier prepare`: every input format, split properties, reproducibility, refusals and each bad input."""

from __future__ import annotations

import hashlib
import io
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SHARED_NPZ, class_image, write_class_folders, written
from PIL import Image
from sklearn.datasets import load_digits

from classifier.cli import main
from classifier.config import PrepareConfig
from classifier.data import prepare as prepare_module
from classifier.data.layout import MANIFEST_COLUMNS, DatasetInfo, read_info, read_manifest
from classifier.data.prepare import WorkerPool, prepare
from classifier.data.sources import read_source
from classifier.errors import UserError


@pytest.fixture(autouse=True)
def untracked(isolated_tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare tracks only when a tracking URI is set; these tests check the dataset, not the run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def run(source: Path, output: Path, **options: object) -> DatasetInfo:
    return prepare(source, output, PrepareConfig(**{"size": 16, "workers": 1, **options}))


def cli(*args: object) -> tuple[int, str]:
    """Exit code and the last line printed (progress bars end with carriage returns, errors with a newline)."""
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result.exit_code, result.output.rstrip("\n").split("\n")[-1]


def png(root: Path, relative: str) -> Image.Image:
    with Image.open(root / relative) as image:
        image.load()
        return image


def test_class_folders_become_the_prepared_layout(image_folder: Path, tmp_path: Path) -> None:
    info = run(image_folder, tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert read_info(tmp_path / "out") == info
    assert info.classes == ["benign", "malignant"] and info.channels == 3 and info.bit_depth == 8
    assert manifest.groupby(["split", "label"]).size().to_dict() == {
        (split, label): n for split, per_class in info.counts.items() for label, n in per_class.items()
    }
    assert len(manifest) == 40 and set(manifest["fold"]) == {-1}
    for row in manifest.itertuples():
        assert row.path == f"{row.split}/{row.label}/{Path(row.source).stem}.png"
        image = png(tmp_path / "out", row.path)
        assert image.size == (16, 16) and image.mode == "RGB"
        assert row.sha256 == hashlib.sha256((image_folder / row.source).read_bytes()).hexdigest()
    assert all(0 < mean < 1 for mean in info.mean) and all(0 < std < 0.5 for std in info.std)
    assert written(tmp_path) == ["images", "out"]  # no staging folder left


def test_splits_are_stratified_with_the_given_fractions(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "images", {"common": 60, "rare": 30}, size=(8, 8))
    info = run(source, tmp_path / "out")
    assert info.counts == {
        "training": {"common": 48, "rare": 24},
        "validation": {"common": 6, "rare": 3},
        "test": {"common": 6, "rare": 3},
    }
    info = run(source, tmp_path / "out2", fractions=[0.6, 0.2, 0.2])
    assert info.counts["test"] == {"common": 12, "rare": 6}


def test_grey_images_stay_grey_unless_asked(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "images", {"a": 10, "b": 10}, mode="L")
    info = run(source, tmp_path / "grey")
    manifest = read_manifest(tmp_path / "grey")
    assert info.channels == 1 and len(info.mean) == 1
    assert png(tmp_path / "grey", manifest["path"][0]).mode == "L"
    assert run(source, tmp_path / "rgb", channels=3).channels == 3
    assert png(tmp_path / "rgb", read_manifest(tmp_path / "rgb")["path"][0]).mode == "RGB"


def write_sixteen_bit(root: Path) -> Path:
    for label, level in (("low", 1000), ("high", 60000)):
        (root / label).mkdir(parents=True)
        for index in range(10):
            Image.fromarray(np.full((24, 32), level + index, dtype=np.uint16)).save(root / label / f"{index}.tif")
    return root


def test_sixteen_bit_grey_tifs_stay_sixteen_bit(tmp_path: Path) -> None:
    info = run(write_sixteen_bit(tmp_path / "images"), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert info.channels == 1 and info.bit_depth == 16
    row = manifest[manifest["label"] == "high"].iloc[0]
    image = png(tmp_path / "out", row["path"])
    assert image.mode == "I;16" and np.asarray(image).min() >= 60000
    assert 0.01 < info.mean[0] < 0.99  # scaled by 65535, not 255


def test_four_channel_tifs_keep_four_channels(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(10):
            colour = (10 * index, 20, 30, 200 if label == "a" else 40)
            Image.new("RGBA", (20, 20), colour).save(tmp_path / "images" / label / f"{index}.tif")
    info = run(tmp_path / "images", tmp_path / "out")
    row = read_manifest(tmp_path / "out").iloc[0]
    assert info.channels == 4 and len(info.mean) == 4
    assert png(tmp_path / "out", row["path"]).getpixel((8, 8))[3] == (200 if row["label"] == "a" else 40)


def test_large_rgb_tiles_are_reduced_to_the_requested_size(tmp_path: Path) -> None:
    colours = {"tumour": (200, 40, 120), "stroma": (230, 170, 200)}
    for label, colour in colours.items():
        (tmp_path / "tiles" / label).mkdir(parents=True)
        for index in range(5):
            Image.new("RGB", (2048, 1536), colour).save(tmp_path / "tiles" / label / f"tile_{index}.tif")
    run(tmp_path / "tiles", tmp_path / "out", size=32, resize="crop", workers=2, fractions=[0.6, 0.2, 0.2])
    for row in read_manifest(tmp_path / "out").itertuples():
        image = png(tmp_path / "out", row.path)
        assert image.size == (32, 32)
        assert image.getpixel((16, 16)) == colours[row.label]


def test_pre_split_folders_are_respected(tmp_path: Path) -> None:
    for split, count in (("training", 12), ("validation", 4), ("test", 4)):
        write_class_folders(tmp_path / "images" / split, {"a": count, "b": count})
    info = run(tmp_path / "images", tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert (manifest["source"].str.split("/").str[0] == manifest["split"]).all()
    assert info.counts == {split: {"a": n, "b": n} for split, n in (("training", 12), ("validation", 4), ("test", 4))}


def test_a_missing_test_split_is_carved_out_of_training(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "images" / "train", {"a": 18, "b": 18})
    write_class_folders(tmp_path / "images" / "val", {"a": 2, "b": 2})
    info = run(tmp_path / "images", tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert info.counts["validation"] == {"a": 2, "b": 2}
    assert info.counts["test"] == {"a": 2, "b": 2}  # 10% of all 40 images, stratified
    assert manifest[manifest["split"] == "test"]["source"].str.startswith("train/").all()


def write_csv(root: Path, patients: int = 12, per_patient: int = 3, **columns: list[str]) -> Path:
    """Images of `patients` patients (label from the patient), listed in root/labels.csv with metadata columns."""
    write_class_folders(
        root / "images", {"nevus": patients * per_patient // 2, "melanoma": patients * per_patient // 2}
    )
    rows = []
    for index, path in enumerate(sorted((root / "images").rglob("*.png"))):
        label = path.parent.name
        patient = f"{label}-{index // per_patient}"
        rows.append({"path": path.relative_to(root).as_posix(), "label": label, "patient": patient, "age": str(index)})
    table = pd.DataFrame(rows)
    for name, values in columns.items():
        table[name] = values
    table.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def test_csv_keeps_metadata_and_each_group_in_one_split(tmp_path: Path) -> None:
    source = write_csv(tmp_path, patients=20)
    info = run(source, tmp_path / "out", group_column="patient")
    manifest = read_manifest(tmp_path / "out")
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "age"] and info.metadata_columns == ["age"]
    table = pd.read_csv(source, dtype=str).set_index("path")
    assert (manifest.set_index("source")["age"].astype(str) == table["age"].reindex(manifest["source"])).all()
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"training", "validation", "test"}


def test_csv_split_column_is_respected(tmp_path: Path) -> None:
    splits = (["training"] * 3 + ["validation", "test", "training"]) * 6
    source = write_csv(tmp_path, patients=12, split=splits)
    run(source, tmp_path / "out")
    manifest = read_manifest(tmp_path / "out").set_index("source")
    expected = pd.read_csv(source, dtype=str).set_index("path")["split"]
    assert (manifest["split"] == expected.reindex(manifest.index)).all()


def write_npz(path: Path, train: int = 40, val: int = 10, test: int = 0, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("val", val), ("test", test)):
        if count:
            arrays.setdefault(f"{prefix}_images", rng.integers(0, 255, (count, 12, 12), dtype=np.uint8))
            arrays.setdefault(f"{prefix}_labels", (np.arange(count) % 2).reshape(-1, 1))
    np.savez(path, **arrays)
    return path


def test_npz_official_splits_are_kept_and_test_is_carved_from_train(tmp_path: Path) -> None:
    source = write_npz(tmp_path / "mnist.npz")
    info = run(source, tmp_path / "out", class_names=["normal", "pneumonia"])
    manifest = read_manifest(tmp_path / "out")
    assert info.classes == ["normal", "pneumonia"] and info.channels == 1
    assert manifest[manifest["split"] == "validation"]["source"].str.startswith("val_images[").all()
    assert (manifest["split"] == "validation").sum() == 10
    assert info.counts["test"] == {"normal": 3, "pneumonia": 2} or info.counts["test"] == {"normal": 2, "pneumonia": 3}
    row = manifest[manifest["source"] == "val_images[3]"].iloc[0]
    arrays = np.load(source)
    expected = Image.fromarray(arrays["val_images"][3]).resize((16, 16), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(png(tmp_path / "out", row["path"])), np.asarray(expected))
    assert row["label"] == "pneumonia"


def test_npz_with_test_arrays_keeps_all_three_splits(tmp_path: Path) -> None:
    info = run(write_npz(tmp_path / "mnist.npz", train=20, val=6, test=8), tmp_path / "out")
    assert {split: sum(n.values()) for split, n in info.counts.items()} == {"training": 20, "validation": 6, "test": 8}


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="shared PneumoniaMNIST file not present")
def test_shared_pneumonia_npz_reads_with_its_official_splits() -> None:
    records = read_source(SHARED_NPZ, class_names=["normal", "pneumonia"]).records
    assert sum(record.split == "training" for record in records) == 4708
    assert sum(record.split == "validation" for record in records) == 524
    assert {record.label for record in records} == {"normal", "pneumonia"}


def test_folds_replace_validation_and_are_stratified(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "images", {"a": 30, "b": 20}, size=(8, 8))
    info = run(source, tmp_path / "out", folds=5)
    manifest = read_manifest(tmp_path / "out")
    assert set(manifest["split"]) == {"training", "test"} and info.folds == 5
    assert set(manifest[manifest["split"] == "test"]["fold"]) == {-1}
    per_fold = manifest[manifest["split"] == "training"].groupby(["fold", "label"]).size().unstack()
    assert list(per_fold.index) == [0, 1, 2, 3, 4]
    assert (per_fold.max() - per_fold.min() <= 1).all()  # each class spread evenly over the folds
    assert per_fold.sum().to_dict() == info.counts["training"]


def test_groups_stay_in_one_fold(tmp_path: Path) -> None:
    source = write_csv(tmp_path, patients=20)
    run(source, tmp_path / "out", folds=3, group_column="patient")
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.groupby("group")["fold"].nunique() == 1).all()
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    training = manifest[manifest["split"] == "training"]
    assert set(training["fold"]) == {0, 1, 2} and (training.groupby("fold")["label"].nunique() == 2).all()


def test_same_inputs_and_seed_give_byte_identical_files_other_seed_other_split(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "images", {"a": 20, "b": 20}, size=(8, 8))
    run(source, tmp_path / "first")
    run(source, tmp_path / "second", workers=2)
    for name in ("manifest.csv", "dataset.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    run(source, tmp_path / "other", seed=7)
    first, other = read_manifest(tmp_path / "first"), read_manifest(tmp_path / "other")
    assert not first.set_index("source")["split"].equals(other.set_index("source")["split"])
    assert read_info(tmp_path / "other").counts == read_info(tmp_path / "first").counts


def test_existing_output_is_reused_refused_or_overwritten(image_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    run(image_folder, output)
    written = (output / "dataset.json").stat().st_mtime_ns
    run(image_folder, output)
    assert (output / "dataset.json").stat().st_mtime_ns == written  # up to date: nothing rewritten
    with pytest.raises(UserError, match="prepared from other inputs or settings; pass --overwrite"):
        run(image_folder, output, seed=1)
    assert read_info(output).seed == 42
    assert run(image_folder, output, seed=1, overwrite=True).seed == 1
    assert read_info(output).seed == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a prepared dataset"):
        run(image_folder, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_an_empty_output_folder_is_filled(image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert sum(sum(n.values()) for n in run(image_folder, tmp_path / "out").counts.values()) == 40
    assert len(read_manifest(tmp_path / "out")) == 40


def test_changed_image_content_is_seen_on_the_rerun(image_folder: Path, tmp_path: Path) -> None:
    """A first prepare hashes each file as it converts it, a rerun hashes the sources first: both must agree."""
    truncated = image_folder / "benign" / "cut.png"
    buffer = io.BytesIO()
    class_image(0, 0, (64, 64)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:-200])  # readable header, fails while decoding: skipped
    first = run(image_folder, tmp_path / "out", skip_invalid=True)
    assert [entry["path"] for entry in first.skipped] == ["benign/cut.png"]
    assert run(image_folder, tmp_path / "out", skip_invalid=True) == first  # up to date, the skipped file included

    changed = image_folder / "malignant" / "malignant_000.png"
    class_image(1, 99).save(changed)
    with pytest.raises(UserError, match="prepared from other inputs or settings"):
        run(image_folder, tmp_path / "out", skip_invalid=True)
    second = run(image_folder, tmp_path / "out", skip_invalid=True, overwrite=True)
    row = read_manifest(tmp_path / "out").set_index("source").loc["malignant/malignant_000.png"]
    assert row["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert second.fingerprint != first.fingerprint
    assert run(image_folder, tmp_path / "out", skip_invalid=True) == second


def test_a_second_prepare_into_the_same_output_fails_at_once(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, errors = tmp_path / "out", []
    convert = prepare_module._Converter.__call__

    def and_another_prepare(self: prepare_module._Converter, job: prepare_module.Job) -> prepare_module.Converted:
        if not errors:  # while the first prepare is writing
            with pytest.raises(UserError) as raised:
                run(image_folder, output)
            errors.append(raised.value.message)
        return convert(self, job)

    monkeypatch.setattr(prepare_module._Converter, "__call__", and_another_prepare)
    info = run(image_folder, output)
    assert errors == [f"{output}: another prepare is writing OUTPUT; wait for it or choose another OUTPUT"]
    assert read_info(output) == info and len(read_manifest(output)) == 40
    assert written(tmp_path) == ["images", "out"]  # lock file removed


def add_bad_images(folder: Path, count: int) -> None:
    buffer = io.BytesIO()
    class_image(0, 0, (64, 64)).save(buffer, format="PNG")
    for index in range(count):
        kind = index % 3
        data = b"" if kind == 0 else b"plain text" if kind == 1 else buffer.getvalue()[:300]
        (folder / f"bad_{index}.png").write_bytes(data)


def test_bad_images_are_all_listed_and_nothing_is_written(image_folder: Path, tmp_path: Path) -> None:
    add_bad_images(image_folder / "benign", 7)
    code, output = cli("prepare", image_folder, tmp_path / "out", "--size", 16, "--workers", 1)
    assert code == 1
    assert output.startswith("Error: 7 invalid images: benign/bad_0.png: empty file")
    assert "benign/bad_1.png: not a readable image" in output and "(and 2 more)" in output
    assert "benign/bad_2.png: corrupt or truncated image" in output  # found while decoding, listed all the same
    assert "--skip-invalid" in output
    assert written(tmp_path) == ["images"]


def test_truncated_image_found_while_decoding_fails_and_leaves_nothing(image_folder: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    class_image(0, 0, (64, 64)).save(buffer, format="PNG")
    (image_folder / "benign" / "cut.png").write_bytes(buffer.getvalue()[:-200])
    code, output = cli("prepare", image_folder, tmp_path / "new" / "folders" / "out", "--size", 16, "--workers", 2)
    assert code == 1 and "1 invalid image: benign/cut.png: corrupt or truncated image" in output
    assert written(tmp_path) == ["images"]


def test_skip_invalid_records_the_skipped_images(image_folder: Path, tmp_path: Path) -> None:
    add_bad_images(image_folder / "malignant", 3)
    info = run(image_folder, tmp_path / "out", skip_invalid=True)
    assert [entry["path"] for entry in info.skipped] == [f"malignant/bad_{index}.png" for index in range(3)]
    assert [entry["reason"] for entry in info.skipped][:2] == [
        "empty file (0 bytes)",
        "not a readable image (UnidentifiedImageError)",
    ]
    assert read_info(tmp_path / "out").skipped == info.skipped
    assert len(read_manifest(tmp_path / "out")) == 40


def bad_source(kind: str, root: Path) -> tuple[Path, list[str]]:
    """A source with one problem of `kind`, and extra CLI options."""
    images = root / "images"
    root.mkdir(parents=True)
    if kind == "unsupported mode":
        write_class_folders(images, {"a": 10, "b": 10})
        Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(images / "a" / "float.tif")
    elif kind == "empty class":
        write_class_folders(images, {"a": 4, "b": 4})
        (images / "c").mkdir()
    elif kind == "one class":
        write_class_folders(images, {"a": 4})
    elif kind in ("missing file", "empty label"):
        csv = write_csv(root, patients=4)
        table = pd.read_csv(csv, dtype=str)
        table.loc[2, "path" if kind == "missing file" else "label"] = "gone.png" if kind == "missing file" else ""
        table.to_csv(csv, index=False)
        return csv, []
    elif kind in ("npz keys", "npz lengths"):
        arrays = {"val_images": np.zeros((5, 8, 8), np.uint8)} if kind == "npz keys" else {}
        if kind == "npz lengths":
            arrays["train_labels"] = np.zeros((3, 1), dtype=np.int64)
        return write_npz(root / "data.npz", val=0, **arrays), []
    else:
        write_class_folders(images, {"a": 4, "b": 6})
        return images, {"fractions": ["--fractions", "0.8,0.1,0.2"], "folds 1": ["--folds", "1"]}.get(
            kind, ["--folds", "5", "--fractions", "1,0,0"]
        )
    return images, []


@pytest.mark.parametrize(
    "kind,message",
    [
        ("unsupported mode", "a/float.tif: unsupported image mode F"),
        ("empty class", "images/c: class folder with no images"),
        ("one class", "only one class (a)"),
        ("missing file", "labels.csv: 1 rows (row 4: gone.png) point at missing image files"),
        ("empty label", "labels.csv: 1 rows (row 4) have an empty 'label'"),
        ("npz keys", "data.npz: has val_* arrays but no 'val_labels'"),
        ("npz lengths", "data.npz: train_images has 40 images but train_labels 3 labels"),
        ("fractions", "option 'fractions' must be 3 non-negative numbers (training, validation, test) summing to 1"),
        ("folds 1", "option 'folds' must be at least 2"),
        ("folds > smallest class", "--folds 5: more folds than the 4 training images of class 'a'"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path: Path, kind: str, message: str) -> None:
    source, options = bad_source(kind, tmp_path / "source")
    code, output = cli("prepare", source, tmp_path / "out", "--size", 16, "--workers", 1, *options)
    assert code == 1
    assert output.startswith("Error: ")
    assert message in output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_example_data_writes_the_digits_as_class_folders(tmp_path: Path) -> None:
    code, output = cli("example-data", tmp_path / "digits")
    assert code == 0, output
    folders = sorted(path.name for path in (tmp_path / "digits").iterdir())
    assert folders == [str(digit) for digit in range(10)]
    files = sorted((tmp_path / "digits").rglob("*.png"))
    assert len(files) == 1797
    image = png(tmp_path / "digits", "0/0000.png")
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), np.rint(load_digits().images[0] * 255 / 16))
    code, output = cli("example-data", tmp_path / "digits")
    assert code == 1 and "not an empty folder" in output


def _sigterm_is_default(_: object) -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_workers_die_on_terminate_even_when_the_parent_catches_sigterm() -> None:
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as `classifier train` does, in-process
    try:
        with WorkerPool(2) as pool:
            assert all(pool.imap(_sigterm_is_default, list(range(8))))
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_cli_gives_back_the_sigterm_handler_it_set_for_training(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    CliRunner().invoke(main, ["train", str(tmp_path), "--epochs", "1"])  # fails: not a prepared dataset
    assert signal.getsignal(signal.SIGTERM) is before


def sideways_jpeg(path: Path) -> Path:
    """A JPEG stored 40 wide and 20 high, bright on its left half, tagged EXIF orientation 6 (rotate 90° clockwise
    to view): upright it is 20 wide and 40 high, bright on its top half, as a phone writes a portrait photo."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 250
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_an_exif_rotated_jpeg_is_prepared_upright(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "images", {"a": 4, "b": 4})
    sideways_jpeg(source / "a" / "portrait.jpg")

    run(source, tmp_path / "out", size=16, resize="pad", fractions=[1.0, 0.0, 0.0])

    pixels = np.asarray(png(tmp_path / "out", "training/a/portrait.png").convert("L"), dtype=float)
    top, bottom = pixels[:8, 4:12].mean(), pixels[8:, 4:12].mean()
    assert top > 200 and bottom < 50  # bright on top: turned upright, not left sideways
    assert pixels[:, :3].max() < 10 and pixels[:, 13:].max() < 10  # a portrait padded left and right


@pytest.mark.parametrize("inside", ["source/prepared", "source", "source/a/deeper"])
def test_output_inside_source_is_refused(tmp_path: Path, inside: str) -> None:
    source = write_class_folders(tmp_path / "source", {"a": 4, "b": 4})

    code, output = cli("prepare", source, tmp_path / inside, "--size", 16, "--workers", 1)

    assert code == 1 and "OUTPUT is inside SOURCE" in output
    assert sorted(path.name for path in source.iterdir()) == ["a", "b"]


def test_output_holding_the_source_is_refused(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "data" / "source", {"a": 4, "b": 4})

    code, output = cli("prepare", source, tmp_path / "data", "--size", 16, "--workers", 1)

    assert code == 1 and "OUTPUT holds SOURCE" in output
