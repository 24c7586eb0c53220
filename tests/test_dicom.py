"""DICOM inputs: pydicom's own test files and small ones written here, read as prepare, predict and the model do."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import write_checkpoint
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from classifier.cli import main
from classifier.config import PrepareConfig
from classifier.data.dicom import DicomSettings, read_dicom
from classifier.data.images import is_image_file, open_image
from classifier.data.layout import read_info, read_manifest
from classifier.data.prepare import prepare
from classifier.errors import UserError
from classifier.model.checkpoint import read_checkpoint
from classifier.model.pyfunc import ImageClassifier

warnings.filterwarnings("ignore", module="pydicom")


def shipped(name: str) -> bytes:
    """One of the test files installed with pydicom (no download)."""
    return Path(get_testdata_file(name)).read_bytes()


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, **tags) -> Path:
    """A Secondary Capture DICOM of `pixels` (H x W, H x W x 3, or frames x H x W) with `tags` set."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OT", tags.pop("PatientID", "P-0001")
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(image: Image.Image) -> np.ndarray:
    assert image.mode == "I;16"
    return np.asarray(image).astype(np.int64)


def ramp(height: int = 16, width: int = 64, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, width).round().astype(np.uint16), (height, 1))


def test_ct_applies_the_rescale_then_the_window_and_keeps_16_bits():
    import pydicom
    from pydicom.pixels import apply_modality_lut

    data = shipped("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    hounsfield = apply_modality_lut(ds.pixel_array, ds)  # RescaleSlope/Intercept of the file
    assert float(ds.RescaleIntercept) != 0

    pixels = grey(read_dicom(data, "CT_small.dcm", DicomSettings(window=(40.0, 400.0))))

    assert pixels.shape == (128, 128)
    assert (pixels[hounsfield < -161] == 0).all() and (pixels[hounsfield > 240] == 65535).all()
    inside = (hounsfield > -150) & (hounsfield < 230)
    assert inside.sum() > 1000 and len(np.unique(pixels[inside])) > 256  # more grey levels than 8 bits hold
    order = np.argsort(hounsfield[inside], kind="stable")
    assert np.all(np.diff(pixels[inside][order]) >= 0)  # the window is monotonic in Hounsfield units


def test_window_option_replaces_the_files_window(tmp_path: Path):
    stored = ramp().astype(np.uint16)  # 0..4095 stored, -1024..3071 after the rescale below
    path = write_dicom(
        tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=2000, WindowWidth=100
    )

    own = grey(read_dicom(path.read_bytes(), "ct.dcm"))
    lung = grey(read_dicom(path.read_bytes(), "ct.dcm", DicomSettings(window=(-600.0, 1500.0))))

    hounsfield = stored.astype(np.int64) - 1024
    assert (own[hounsfield < 1950] == 0).all() and (own[hounsfield > 2050] == 65535).all()
    assert (lung[hounsfield < -1350] == 0).all() and (lung[hounsfield > 150] == 65535).all()
    middle = (hounsfield > -1300) & (hounsfield < 100)
    assert np.all(np.diff(lung[0][middle[0]]) > 0)  # strictly rising across the window: no banding


def test_without_a_window_the_frames_range_is_used(tmp_path: Path):
    path = write_dicom(tmp_path / "plain.dcm", ramp(top=1000) + 500)
    pixels = grey(open_image(path))
    assert pixels.min() == 0 and pixels.max() == 65535


def test_monochrome1_is_inverted(tmp_path: Path):
    stored = ramp()
    normal = grey(read_dicom(write_dicom(tmp_path / "m2.dcm", stored).read_bytes(), "m2.dcm"))
    inverted = grey(read_dicom(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1").read_bytes(), "m1.dcm"))
    assert normal[0, 0] == 0 and inverted[0, 0] == 65535  # stored 0 is black in MONOCHROME2, white in MONOCHROME1
    np.testing.assert_array_equal(inverted, 65535 - normal)


def test_compressed_files_decode_as_their_uncompressed_original():
    original = grey(read_dicom(shipped("MR_small.dcm"), "MR_small.dcm"))
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        np.testing.assert_array_equal(grey(read_dicom(shipped(name), name)), original)
    colour = read_dicom(shipped("SC_rgb_jpeg_dcmtk.dcm"), "SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline, YBR
    assert colour.mode == "RGB" and colour.size == (100, 100)
    red = np.asarray(colour)[5, 50]  # the test image's top band is red
    assert red[0] > 200 and red[1] < 50 and red[2] < 50


def test_a_missing_decoder_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    monkeypatch.setattr(get_decoder(JPEGLSLossless), "_available", {})  # as without pylibjpeg installed
    with pytest.raises(UserError) as raised:
        read_dicom(shipped("MR_small_jpeg_ls_lossless.dcm"), "scan.dcm")
    message = raised.value.message
    assert message.startswith("scan.dcm: ") and "JPEG-LS" in message and "classifier[dicom-compressed]" in message
    assert "\n" not in message


def test_a_transfer_syntax_nothing_decodes_is_a_one_line_error(tmp_path: Path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(write_dicom(tmp_path / "video.dcm", ramp()))
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(100)])  # an MPEG-2 sequence header
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "video.dcm")

    with pytest.raises(UserError, match=r"^video.dcm: transfer syntax MPEG2 Main Profile / Main Level .* no decoder"):
        open_image(tmp_path / "video.dcm", name="video.dcm")


def test_multi_frame_reads_the_first_frame_or_the_one_asked_for(tmp_path: Path):
    frames = np.stack([np.full((8, 8), value, dtype=np.uint16) for value in (0, 1000, 4000)])
    frames[:, 0, :2] = (0, 4095)  # each frame spans the range, so its level shows after scaling
    path = write_dicom(tmp_path / "cine.dcm", frames)
    first = grey(open_image(path))
    third = grey(open_image(path, dicom=DicomSettings(frame=2)))
    assert first[4, 4] == 0 and third[4, 4] == round(4000 / 4095 * 65535)
    with pytest.raises(UserError, match=r"cine.dcm: --frame 3 is out of range; the file has 3 frame"):
        open_image(path, dicom=DicomSettings(frame=3))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rtdose.dcm", r"rtdose.dcm: a 3-D volume of 15 slices, but a 2-D image is expected; pass --frame K"),
        ("reportsi.dcm", r"reportsi.dcm: DICOM without pixel data \(modality SR\)"),
    ],
)
def test_a_volume_or_a_dicom_without_pixels_is_a_one_line_error(name: str, expected: str):
    with pytest.raises(UserError, match=expected) as raised:
        read_dicom(shipped(name), name)
    assert "\n" not in raised.value.message


def test_a_slice_of_a_volume_with_frame():
    image = read_dicom(shipped("rtdose.dcm"), "rtdose.dcm", DicomSettings(frame=7))
    assert image.mode == "I;16" and image.size == (10, 10)


def test_files_without_a_suffix_are_dicom_by_their_preamble(tmp_path: Path):
    path = write_dicom(tmp_path / "IM0001", ramp())
    (tmp_path / "NOTES").write_text("not an image")
    assert is_image_file(path) and not is_image_file(tmp_path / "NOTES")
    assert open_image(path).mode == "I;16"


def dicom_patients(root: Path, patients: int = 12, per_patient: int = 2) -> Path:
    """root/<class>/<patient>_<n>.dcm: each patient has one class; images of a class are bright in one half."""
    rng = np.random.default_rng(0)
    for patient in range(patients):
        label = ("normal", "pneumonia")[patient % 2]
        for index in range(per_patient):
            pixels = rng.integers(0, 1500, (24, 24)).astype(np.uint16)
            pixels[:, :12] += 2500 if label == "pneumonia" else 0
            name = f"Doe^Jane{patient}"
            write_dicom(root / label / f"p{patient}_{index}.dcm", pixels, PatientID=name, PatientName=name)
    return root


def test_prepare_groups_by_patient_id_and_stores_only_its_salted_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSIFIER_GROUP_SALT", "site-secret")
    source = dicom_patients(tmp_path / "dicoms")
    config = PrepareConfig(size=16, group_tag="PatientID", fractions=[0.5, 0.25, 0.25], seed=1)

    info = prepare(source, tmp_path / "data", config)

    manifest = read_manifest(tmp_path / "data")
    assert info.bit_depth == 16 and info.channels == 1 and len(manifest) == 24
    assert manifest.groupby("group")["split"].nunique().eq(1).all()  # a patient's images stay in one split
    assert manifest["group"].nunique() == 12 and manifest["group"].str.fullmatch(r"[0-9a-f]{16}").all()
    written = (tmp_path / "data" / "manifest.csv").read_text() + (tmp_path / "data" / "dataset.json").read_text()
    assert "Doe" not in written and "Jane" not in written
    assert Image.open(tmp_path / "data" / manifest["path"][0]).mode == "I;16"

    monkeypatch.setenv("CLASSIFIER_GROUP_SALT", "another-site")
    other = prepare(source, tmp_path / "other", config)
    assert set(read_manifest(tmp_path / "other")["group"]).isdisjoint(manifest["group"])  # the salt matters
    assert other.fingerprint != info.fingerprint


def test_the_prepare_run_logs_no_patient_identifier(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("CLASSIFIER_GROUP_SALT", "site-secret")
    source = dicom_patients(tmp_path / "dicoms")
    arguments = ["prepare", str(source), str(tmp_path / "data"), "--size", "16", "--group-tag", "PatientID"]
    result = CliRunner().invoke(main, [*arguments, "--fractions", "0.5,0.25,0.25", "--experiment", "dicom"])
    assert result.exit_code == 0, result.output

    (run,) = mlflow.search_runs(experiment_names=["dicom"], output_format="list")
    assert run.data.params["group_tag"] == "PatientID" and run.data.params["keep_tags"] == "False"
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "logged"))
    texts = [path.read_text() for path in Path(logged).rglob("*") if path.is_file()]
    texts += [str(run.data.params), str(run.data.tags), str(run.inputs)]
    assert texts and not any("Doe" in text or "Jane" in text or "site-secret" in text for text in texts)


def test_group_tag_must_name_a_dicom_attribute_that_every_file_has(tmp_path):
    source = dicom_patients(tmp_path / "dicoms")
    with pytest.raises(UserError, match=r"^--group-tag PatientId: not a DICOM keyword; use one such as PatientID"):
        prepare(source, tmp_path / "data", PrepareConfig(group_tag="PatientId"))
    (source / "normal" / "plan.dcm").write_bytes(shipped("rtplan.dcm"))
    write_dicom(source / "normal" / "anonymous.dcm", ramp(), PatientID="")
    with pytest.raises(UserError, match=r"^--group-tag PatientID: 1 of 26 files lack it: .*anonymous.dcm: no Patient"):
        prepare(source, tmp_path / "data", PrepareConfig(group_tag="PatientID"))
    assert not (tmp_path / "data").exists()


def test_prepare_keeps_the_raw_tag_only_when_asked(tmp_path):
    source = dicom_patients(tmp_path / "dicoms")
    config = PrepareConfig(size=16, group_tag="PatientID", keep_tags=True, fractions=[0.5, 0.25, 0.25])
    prepare(source, tmp_path / "data", config)
    assert set(read_manifest(tmp_path / "data")["group"]) == {f"Doe^Jane{patient}" for patient in range(12)}


def test_prepare_lists_the_bad_dicoms_and_writes_nothing(tmp_path):
    source = dicom_patients(tmp_path / "dicoms")
    (source / "normal" / "report.dcm").write_bytes(shipped("reportsi.dcm"))
    (source / "pneumonia" / "dose.dcm").write_bytes(shipped("rtdose.dcm"))

    result = CliRunner().invoke(main, ["prepare", str(source), str(tmp_path / "data"), "--size", "16"])

    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1].removeprefix("Error: ")
    assert "2 invalid images" in message and "\n" not in message
    assert "normal/report.dcm: DICOM without pixel data" in message
    assert "pneumonia/dose.dcm: a 3-D volume of 15 slices" in message
    assert not (tmp_path / "data").exists()


def test_prepare_window_and_frame_reach_the_model(tmp_path):
    source = dicom_patients(tmp_path / "dicoms")
    result = CliRunner().invoke(
        main, ["prepare", str(source), str(tmp_path / "data"), "--size", "16", "--window", "2000,2000", "--frame", "0"]
    )
    assert result.exit_code == 0, result.output
    assert read_info(tmp_path / "data").dicom == {"window": [2000.0, 2000.0], "frame": 0}


def dicom_model(tmp_path: Path, dicom: dict | None = None) -> ImageClassifier:
    path = write_checkpoint(tmp_path / "grey.pt", size=16, channels=1)
    checkpoint = read_checkpoint(path)
    checkpoint["preprocessing"].update(bit_depth=16, dicom=dicom or {})
    return ImageClassifier(checkpoint, decode_workers=1)


def test_the_model_reads_dicom_bytes_and_paths_and_reports_bad_ones_in_their_row(tmp_path):
    scan = write_dicom(tmp_path / "IM0001", ramp())
    model = dicom_model(tmp_path)

    table = model.predict([scan.read_bytes(), str(scan), shipped("reportsi.dcm"), shipped("rtdose.dcm")])

    assert table["error"][:2].isna().all() and table["prob_benign"][0] == pytest.approx(table["prob_benign"][1])
    assert table["error"][2] == "row 2: DICOM without pixel data (modality SR); pass an image DICOM"
    assert table["error"][3].startswith("row 3: a 3-D volume of 15 slices")
    assert table["label"][2:].isna().all()


def test_the_models_stored_window_applies_unless_overridden(tmp_path):
    scan = write_dicom(tmp_path / "ct.dcm", ramp())
    stored = dicom_model(tmp_path, {"window": [1000.0, 10.0], "frame": None})
    own = dicom_model(tmp_path)
    overridden = ImageClassifier(
        {**read_checkpoint(tmp_path / "grey.pt"), "preprocessing": stored_preprocessing(stored)},
        dicom_window=[2048.0, 4096.0],
    )
    assert stored.dicom.window == (1000.0, 10.0) and overridden.dicom.window == (2048.0, 4096.0)
    narrow = stored.preprocess(scan.read_bytes()).numpy()
    wide = own.preprocess(scan.read_bytes()).numpy()
    assert np.isin(narrow, [0.0, 1.0]).mean() > 0.8 > 0.2 > np.isin(wide, [0.0, 1.0]).mean()


def stored_preprocessing(model: ImageClassifier) -> dict:
    return {
        "size": model.size,
        "channels": model.channels,
        "bit_depth": model.bit_depth,
        "mean": [0.5],
        "std": [0.25],
        "resize": model.resize_mode,
        "dicom": model.dicom.to_plain(),
    }


def test_predict_command_takes_dicom_folders_and_files_without_suffix(tmp_path):
    folder = tmp_path / "scans"
    write_dicom(folder / "a.dcm", ramp())
    write_dicom(folder / "IM0002", ramp(top=2000))
    (folder / "report.dcm").write_bytes(shipped("reportsi.dcm"))
    checkpoint = write_checkpoint(tmp_path / "grey.pt", size=16, channels=1)

    result = CliRunner().invoke(main, ["predict", str(checkpoint), str(folder), "--output", "-", "--window", "0,4000"])

    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert sorted(Path(path).name for path in table["path"]) == ["IM0002", "a.dcm", "report.dcm"]
    bad = table[table["path"].str.endswith("report.dcm")].iloc[0]
    assert "DICOM without pixel data" in bad["error"]
    assert table[~table["path"].str.endswith("report.dcm")]["error"].isna().all()


def test_window_option_is_checked():
    result = CliRunner().invoke(main, ["predict", "x.pt", ".", "--window", "40"])
    assert result.exit_code != 0 and "CENTRE,WIDTH" in result.output


def test_serve_predicts_an_uploaded_dicom_and_rejects_a_volume_naming_it(tmp_path):
    from fastapi.testclient import TestClient

    from classifier.model.pyfunc import load_classifier
    from classifier.serving.http import create_app

    checkpoint = write_checkpoint(tmp_path / "grey.pt", size=16, channels=1)
    client = TestClient(create_app(load_classifier(str(checkpoint)), str(checkpoint)))
    scan = write_dicom(tmp_path / "IM0001", ramp()).read_bytes()

    answered = client.post("/predict", files=[("files", ("IM0001", scan, "application/dicom"))])
    rejected = client.post(
        "/predict", files=[("files", ("IM0001", scan)), ("files", ("dose.dcm", shipped("rtdose.dcm")))]
    )

    assert answered.status_code == 200 and answered.json()["predictions"][0]["file"] == "IM0001"
    assert rejected.status_code == 415 and rejected.json()["file"] == "dose.dcm"
    assert rejected.json()["detail"].startswith("dose.dcm: a 3-D volume of 15 slices")


def test_the_logged_pyfunc_model_reads_base64_dicom(tmp_path, experiment):
    import base64

    import mlflow

    from classifier.model.pyfunc import log_classifier_model

    checkpoint = write_checkpoint(tmp_path / "grey.pt", size=16, channels=1)
    with mlflow.start_run(experiment_id=experiment):
        info = log_classifier_model(checkpoint)
    model = mlflow.pyfunc.load_model(info.model_uri)
    scan = base64.b64encode(write_dicom(tmp_path / "a.dcm", ramp()).read_bytes()).decode()
    report = base64.b64encode(shipped("reportsi.dcm")).decode()

    table = model.predict(pd.DataFrame({"image": [scan, report]}))

    assert pd.isna(table["error"][0]) and table["label"][0] in ("benign", "malignant")
    assert "DICOM without pixel data" in table["error"][1]
    assert "pydicom" in " ".join(Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text().split())
