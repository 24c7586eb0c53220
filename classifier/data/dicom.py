"""Read DICOM files into the images the rest of the pipeline takes: modality LUT, VOI LUT or window, MONOCHROME1
inverted, 16-bit grey kept 16-bit until the resize, one frame of a multi-frame file.

pydicom decodes uncompressed, RLE and (through Pillow) JPEG baseline and JPEG 2000 pixel data itself; JPEG lossless
and JPEG-LS need pylibjpeg, installed by the `dicom-compressed` extra. A file that needs a missing decoder fails with a
one-line error naming the extra.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from classifier.errors import UserError

DICOM_SUFFIX = ".dcm"
PREAMBLE = 128  # bytes before the "DICM" magic of a DICOM Part 10 file
MAGIC = b"DICM"
EXTRA = "dicom-compressed"
# Tags whose presence marks the frames of a multi-frame file as slices of a 3-D volume rather than a time series.
VOLUME_TAGS = ("GridFrameOffsetVector", "SliceLocationVector")
SALT_VARIABLE = "CLASSIFIER_GROUP_SALT"
SALT_FILE = Path("~/.config/classifier/group-salt")


@dataclass(frozen=True)
class DicomSettings:
    """How a DICOM becomes an image: `window` (centre, width) instead of the file's VOI LUT / window, and `frame`,
    the frame of a multi-frame file to read (default the first; required for a 3-D volume)."""

    window: tuple[float, float] | None = None
    frame: int | None = None

    @classmethod
    def from_plain(cls, values: dict[str, Any] | None) -> DicomSettings:
        """From the plain dict stored in dataset.json and checkpoints (None or {} for the defaults)."""
        values = values or {}
        window = values.get("window")
        return cls(tuple(float(part) for part in window) if window else None, values.get("frame"))  # type: ignore[arg-type]

    def to_plain(self) -> dict[str, Any]:
        return {"window": list(self.window) if self.window else None, "frame": self.frame}


def is_dicom(data: bytes, name: str | Path | None = None) -> bool:
    """A `.dcm` file, or any content with the DICM magic after the 128-byte preamble."""
    return data[PREAMBLE : PREAMBLE + 4] == MAGIC or str(name or "").lower().endswith(DICOM_SUFFIX)


def has_dicom_preamble(path: Path) -> bool:
    """Whether the file at `path` starts like a DICOM Part 10 file (for files without a suffix)."""
    try:
        with path.open("rb") as file:
            return file.read(PREAMBLE + 4)[PREAMBLE:] == MAGIC
    except OSError:
        return False


def _dataset(source: bytes | BinaryIO, name: str, pixels: bool = True, tags: list[str] | None = None) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    file = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(file, force=True, stop_before_pixels=not pixels, specific_tags=tags)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError, AttributeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{name}: not a readable DICOM file ({type(error).__name__}: {reason}); replace it") from error


def _check_pixels(ds: Any, name: str) -> None:
    """Refuse a DICOM without an image (a report, a plan) and one whose compression no installed decoder reads."""
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) or "Rows" not in ds:
        kind = ds.get("Modality") or ds.get("SOPClassUID", "unknown")
        raise UserError(f"{name}: DICOM without pixel data (modality {kind}); pass an image DICOM")
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    file_meta = getattr(ds, "file_meta", None)
    syntax = UID(file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if file_meta is not None else None
    if syntax is None or not syntax.is_encapsulated:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UserError(
            f"{name}: transfer syntax {syntax.name} ({syntax}) has no decoder; convert the file to an uncompressed "
            "DICOM (e.g. `gdcmconv --raw`)"
        ) from None
    if not decoder.is_available:
        raise UserError(
            f"{name}: pixel data compressed as {syntax.name} and no decoder for it is installed; "
            f"pip install 'classifier[{EXTRA}]'"
        )


def _frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def is_volume(ds: Any) -> bool:
    """A multi-frame file whose frames are slices at different positions (a 3-D volume: RT dose grid, enhanced
    CT/MR), not a time series (cine, ultrasound loop)."""
    if _frames(ds) < 2:
        return False
    if any(tag in ds for tag in VOLUME_TAGS):
        return True
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    positions = {
        tuple(item.PlanePositionSequence[0].get("ImagePositionPatient") or ())
        for item in per_frame
        if item.get("PlanePositionSequence")
    }
    return len(positions) > 1


def probe_dicom(file: BinaryIO, name: str) -> tuple[int, int]:
    """(channels, bit depth) a DICOM will be read with, without decoding it; a UserError when it cannot be read."""
    ds = _dataset(file, name)  # the pixel data is read as bytes, not decoded
    _check_pixels(ds, name)
    colour = int(ds.get("SamplesPerPixel", 1)) == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    channels = 3 if colour else 1
    return channels, (16 if channels == 1 else 8)


def read_dicom(data: bytes, name: str, settings: DicomSettings | None = None) -> Image.Image:
    """Decode one frame of a DICOM into a 16-bit grey ("I;16") or 8-bit RGB image.

    Grey: the modality LUT (rescale slope/intercept) and then the VOI LUT or window from the file (or
    `settings.window`) are applied and the window's output range is scaled to 0..65535; without any window the
    frame's own range is. MONOCHROME1 (white is low) is inverted so that bright means dense as in MONOCHROME2.
    """
    settings = settings or DicomSettings()
    ds = _dataset(data, name)
    _check_pixels(ds, name)
    frames = _frames(ds)
    frame = settings.frame
    if frame is None and is_volume(ds):
        raise UserError(
            f"{name}: a 3-D volume of {frames} slices, but a 2-D image is expected; pass --frame K (0..{frames - 1}) "
            "to read one slice"
        )
    frame = frame or 0
    if not 0 <= frame < frames:
        raise UserError(f"{name}: --frame {frame} is out of range; the file has {frames} frame(s), 0..{frames - 1}")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    try:
        pixels = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad file, reported with its name
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{name}: cannot decode the DICOM pixel data ({type(error).__name__}: {reason})") from error
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return _colour(apply_color_lut(pixels, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return _colour(pixels, int(ds.get("BitsStored", 8)))
    if pixels.ndim != 2:
        raise UserError(f"{name}: DICOM pixel data of shape {pixels.shape}; expected one 2-D frame")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if settings.window is not None:
        _set_window(ds, *settings.window)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            values = apply_voi_lut(values, ds, prefer_lut=settings.window is None).astype(np.float64)
        except (ValueError, TypeError, AttributeError, IndexError) as error:
            raise UserError(f"{name}: unusable VOI LUT or window ({error}); pass --window CENTRE,WIDTH") from error
        low, high = _voi_range(ds, settings.window is None)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    scaled = np.clip(scaled, 0.0, 1.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(np.round(scaled * 65535).astype(np.uint16))


def _set_window(ds: Any, centre: float, width: float) -> None:
    """Replace the file's VOI LUT and windows by one linear window."""
    for key in ("VOILUTSequence", "VOILUTFunction"):
        if key in ds:
            del ds[key]
    ds.WindowCenter, ds.WindowWidth = centre, width


def _voi_range(ds: Any, prefer_lut: bool) -> tuple[float, float]:
    """The output range of the VOI transform pydicom applied: the LUT's entries, or the window's (PS3.3 C.11.2)."""
    if prefer_lut and ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        return 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        low, high = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _colour(pixels: np.ndarray, bits: int) -> Image.Image:
    """An RGB frame of `bits`-bit samples (pydicom has converted YBR to RGB) as 8-bit RGB."""
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels.astype(np.float64) / (2**bits - 1) * 255)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def check_keyword(tag: str) -> None:
    """Refuse a --group-tag that names no DICOM attribute."""
    from pydicom.datadict import tag_for_keyword

    if tag_for_keyword(tag) is None:
        raise UserError(f"--group-tag {tag}: not a DICOM keyword; use one such as PatientID or StudyInstanceUID")


def group_value(path: Path, tag: str) -> str:
    """The value of DICOM `tag` (a keyword such as PatientID) in the file at `path`, as text; a UserError when the
    file is no DICOM or lacks the tag."""
    with path.open("rb") as file:
        ds = _dataset(file, str(path), pixels=False, tags=[tag])
    value = str(ds.get(tag, "") or "").strip()
    if not value:
        raise UserError(f"{path}: no {tag} in this DICOM; fix the file or group by another tag")
    return value


def group_salt() -> bytes:
    """The secret that group ids are hashed with: $CLASSIFIER_GROUP_SALT, else a random one made once per user in
    ~/.config/classifier/group-salt. It is never written into a dataset or MLflow."""
    if os.environ.get(SALT_VARIABLE):
        return os.environ[SALT_VARIABLE].encode()
    path = SALT_FILE.expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another prepare
            pass
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def hashed_group(value: str, salt: bytes) -> str:
    """A salted hash (HMAC-SHA256, 16 hex digits) of a group id: equal ids stay equal, the id itself is gone."""
    return hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:16]
