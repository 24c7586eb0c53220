"""Open any supported image (grey, 16-bit grey, RGB, 4-channel, large tiles) and bring it to one mode and size."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from classifier.config import RESIZE_MODES
from classifier.data.dicom import DICOM_SUFFIX, DicomSettings, has_dicom_preamble, is_dicom, read_dicom
from classifier.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", DICOM_SUFFIX)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CHANNELS_OF_MODE = {
    "1": 1,
    "L": 1,
    "LA": 1,
    "I": 1,
    "I;16": 1,
    "I;16L": 1,
    "I;16B": 1,
    "I;16N": 1,
    "P": 3,
    "PA": 3,
    "RGB": 3,
    "RGBX": 3,
    "CMYK": 3,
    "YCbCr": 3,
    "RGBA": 4,
}
STORED_MODE = {1: "L", 3: "RGB", 4: "RGBA"}
# Resize in two steps, an integer box reduce then BICUBIC over the last factor >= 2 (Pillow's `reducing_gap`, as in
# `Image.thumbnail`): on a 2048x1536 tile to 256 px, 4x faster than one BICUBIC pass, within 1 grey level on average.
REDUCING_GAP = 2.0
Image.MAX_IMAGE_PIXELS = 300_000_000  # whole-slide-sized tiles are fine; far beyond that is a decompression bomb


def is_image_file(path: Path) -> bool:
    """A file to read as an image: by its suffix, or a suffix-less file with the DICOM preamble."""
    return path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and has_dicom_preamble(path))


def open_image(
    source: Path | str | bytes | BinaryIO,
    size: int | None = None,
    name: str | None = None,
    dicom: DicomSettings | None = None,
) -> Image.Image:
    """Decode an image fully (so truncated files fail here) and turn it upright by its EXIF orientation, raising
    UserError naming the file.

    `size` is a hint: JPEGs are decoded at the smallest DCT scale that still covers `size` x `size` (Pillow's
    `draft`). Multi-page TIFFs with 3 or 4 single-band pages of equal size become one RGB / RGBA image. DICOM files
    (`.dcm`, or the DICM preamble) are read by `classifier.data.dicom` with `dicom` settings (window, frame).
    """
    name = name or (str(source) if isinstance(source, Path | str) else getattr(source, "name", "<image bytes>"))
    if isinstance(source, Path | str):
        try:
            source = Path(source).read_bytes()
        except OSError as error:
            raise UserError(f"{name}: cannot read ({error.strerror}); check the path and its permissions") from error
    if not isinstance(source, bytes):
        source = source.read()
    if not source:
        raise UserError(f"{name}: empty file (0 bytes); replace or remove it")
    if is_dicom(source, name):
        return read_dicom(source, name, dicom)
    source = io.BytesIO(source)
    try:
        image = Image.open(source)
        if image.format == "JPEG" and size is not None:
            image.draft(image.mode, (size, size))
        image.load()
        image = _merge_channel_pages(image)
        ImageOps.exif_transpose(image, in_place=True)  # upright as viewers show it (phones, scanners tag it)
    except UnidentifiedImageError as error:
        raise UserError(f"{name}: not an image Pillow can read; replace or remove it") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{name}: corrupt or truncated image ({error}); replace or remove it") from error
    if image.mode not in CHANNELS_OF_MODE:
        raise UserError(
            f"{name}: unsupported image mode {image.mode}; convert it to 8/16-bit grey, RGB or RGBA (4-channel)"
        )
    return image


def _merge_channel_pages(image: Image.Image) -> Image.Image:
    """A TIFF with 3 or 4 single-band pages of one size (one channel per page) as one RGB or RGBA image."""
    if getattr(image, "n_frames", 1) not in (3, 4) or image.format != "TIFF":
        return image
    pages = [page.copy() for page in ImageSequence.Iterator(image)]
    if any(page.mode != "L" or page.size != image.size for page in pages):
        return pages[0]
    return Image.merge(STORED_MODE[len(pages)], pages)


def image_channels(image: Image.Image) -> int:
    """How many channels `image` holds once stored: 1 (grey), 3 (colour) or 4 (RGBA / RGBY)."""
    return CHANNELS_OF_MODE[image.mode]


def image_bit_depth(image: Image.Image) -> int:
    """16 for 16-bit grey images, 8 otherwise."""
    return 16 if image.mode in SIXTEEN_BIT_MODES else 8


def normalise_mode(image: Image.Image, channels: int, bit_depth: int | None = None) -> Image.Image:
    """Convert to the stored mode: "L" or "I;16" for 1 channel, "RGB" for 3, "RGBA" for 4.

    16-bit grey stays 16-bit unless `bit_depth=8` (scaled, not clipped); `bit_depth=16` widens 8-bit grey.
    """
    if channels not in STORED_MODE:
        raise UserError(f"channels={channels}: must be 1 (grey), 3 (RGB) or 4 (RGBA)")
    sixteen_bit = image.mode in SIXTEEN_BIT_MODES
    if channels == 1 and (bit_depth == 16 or (sixteen_bit and bit_depth is None)):
        if sixteen_bit:
            return image if image.mode == "I;16" else image.convert("I;16")
        pixels = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(pixels)
    if sixteen_bit:
        image = Image.fromarray((np.asarray(image.convert("I;16"), dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode == "LA" and channels == 3:
        image = image.convert("L")
    mode = STORED_MODE[channels]
    return image if image.mode == mode else image.convert(mode)


def resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize to `size` x `size` with BICUBIC: "stretch" ignores the aspect ratio, "pad" fits the whole image
    on a black square, "crop" fills the square and cuts the centre out."""
    if mode not in RESIZE_MODES:
        raise UserError(f"resize={mode!r}: must be one of {', '.join(RESIZE_MODES)}")
    if image.mode.startswith("I;16"):  # Pillow resamples 16-bit grey only as 32-bit "I"
        return resize(image.convert("I"), size, mode).convert("I;16")
    width, height = image.size
    if mode == "stretch":
        return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
    if mode == "crop":
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(
        image.resize(inner, Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP),
        ((size - inner[0]) // 2, (size - inner[1]) // 2),
    )
    return canvas


def open_channels(sources: list[Path | bytes], size: int | None = None, names: list[str] | None = None) -> Image.Image:
    """One image from per-channel grey files (e.g. red, green, blue, yellow): RGB for three, RGBA for four.

    `names` name the files in errors; 16-bit channels are scaled to 8 bits; every channel must have the first's size.
    """
    names = names or [str(source) if isinstance(source, Path) else f"channel {i}" for i, source in enumerate(sources)]
    if len(sources) not in (3, 4):
        raise UserError(f"{names[0]}: {len(sources)} channel files; stack 3 (RGB) or 4 (e.g. RGBY) of them")
    channels = [
        normalise_mode(open_image(source, size=size, name=name), 1, 8)
        for source, name in zip(sources, names, strict=True)
    ]
    for name, channel in zip(names[1:], channels[1:], strict=True):
        if channel.size != channels[0].size:
            raise UserError(
                f"{name}: {channel.size[0]}x{channel.size[1]} px, but {names[0]} is "
                f"{channels[0].size[0]}x{channels[0].size[1]}; every channel file of an image must have one size"
            )
    return Image.merge(STORED_MODE[len(sources)], channels)
