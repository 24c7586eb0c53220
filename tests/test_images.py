"""open_image / normalise_mode / resize: every supported format and mode, and a clear error for each bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import class_image
from PIL import Image

from classifier.data.images import normalise_mode, open_image, resize
from classifier.errors import UserError


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_open_image_reads_each_format(tmp_path: Path, suffix: str, mode: str) -> None:
    path = tmp_path / f"image{suffix}"
    class_image(1, 0, (40, 30), mode).save(path)
    image = open_image(path)
    assert image.size == (40, 30)
    assert image.mode == mode
    reference = np.asarray(class_image(1, 0, (40, 30), mode), dtype=float)
    tolerance = 20 if suffix == ".jpg" else 0
    assert np.abs(np.asarray(image, dtype=float) - reference).mean() <= tolerance


def test_open_image_accepts_bytes_and_file_objects(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    class_image(0, 0).save(buffer, format="PNG")
    assert open_image(buffer.getvalue()).size == (32, 32)
    buffer.seek(0)
    assert open_image(buffer).size == (32, 32)


def test_open_image_decodes_large_jpeg_at_a_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    class_image(2, 0, (2048, 1536)).save(path, quality=90)
    image = open_image(path, size=256)
    assert image.size == (512, 384)  # 1/4 DCT scale: the smallest that still covers 256 x 256
    assert open_image(path).size == (2048, 1536)


def test_sixteen_bit_grey_is_kept_through_mode_and_resize(tmp_path: Path) -> None:
    pixels = np.full((48, 64), 40000, dtype=np.uint16)
    pixels[:, :32] = 1000
    path = tmp_path / "xray.tif"
    Image.fromarray(pixels).save(path)
    image = normalise_mode(open_image(path), channels=1)
    assert image.mode == "I;16"
    resized = np.asarray(resize(image, 16, "stretch"))
    assert resized.dtype == np.uint16
    assert resized[:, 0].tolist() == [1000] * 16
    assert resized[:, -1].tolist() == [40000] * 16


def test_sixteen_bit_grey_is_scaled_not_clipped_to_eight_bits() -> None:
    image = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    assert np.asarray(normalise_mode(image, 1, bit_depth=8)).max() == 40000 >> 8
    assert np.asarray(normalise_mode(image, 3)).max() == 40000 >> 8
    widened = normalise_mode(Image.new("L", (4, 4), 200), 1, bit_depth=16)
    assert widened.mode == "I;16" and np.asarray(widened).max() == 200 * 257


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
@pytest.mark.parametrize("source_mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_normalise_mode_gives_the_stored_mode(source_mode: str, channels: int, mode: str) -> None:
    assert normalise_mode(class_image(0, 0, mode=source_mode), channels).mode == mode


def test_four_page_tif_becomes_one_rgba_image(tmp_path: Path) -> None:
    pages = [Image.new("L", (20, 10), value) for value in (10, 20, 30, 40)]
    path = tmp_path / "protein.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    image = open_image(path)
    assert image.mode == "RGBA"
    assert image.getpixel((5, 5)) == (10, 20, 30, 40)


def test_rgba_tif_keeps_four_channels(tmp_path: Path) -> None:
    path = tmp_path / "rgby.tif"
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(path)
    assert normalise_mode(open_image(path), 4).getpixel((0, 0)) == (1, 2, 3, 4)


def wide_bar() -> Image.Image:
    """96x32: black left third, white middle third, black right third."""
    pixels = np.zeros((32, 96), dtype=np.uint8)
    pixels[:, 32:64] = 255
    return Image.fromarray(pixels)


def test_resize_stretch_fills_the_square() -> None:
    pixels = np.asarray(resize(wide_bar(), 24, "stretch"))
    assert pixels.shape == (24, 24)
    assert pixels[:, 0].max() == 0 and pixels[:, 12].min() == 255


def test_resize_crop_keeps_the_centre() -> None:
    pixels = np.asarray(resize(wide_bar(), 24, "crop"))
    assert pixels.shape == (24, 24)
    assert pixels.min() > 200  # all from the white middle third; BICUBIC rings slightly at the crop edges


def test_resize_pad_keeps_the_aspect_ratio_on_black() -> None:
    pixels = np.asarray(resize(wide_bar(), 24, "pad"))
    assert pixels.shape == (24, 24)
    assert pixels[:8].max() == 0 and pixels[16:].max() == 0  # 96x32 becomes 24x8 in the middle rows
    assert pixels[12, 12] == 255


def test_two_step_resize_of_a_large_tile_matches_one_bicubic_pass() -> None:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    tile = coarse.resize((2048, 1536), Image.Resampling.BICUBIC)
    exact = np.asarray(tile.resize((256, 256), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(np.asarray(resize(tile, 256, "stretch"), dtype=float) - exact).mean() < 1.0


def bad_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    buffer = io.BytesIO()
    class_image(0, 0, (64, 64)).save(buffer, format="PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.fromarray(np.zeros((8, 8), dtype=np.float32)).save(root / "float.tif")
    return {path.stem: path for path in root.iterdir()}


@pytest.mark.parametrize(
    "name,message",
    [
        ("empty", "empty file"),
        ("notes", "not an image"),
        ("truncated", "truncated"),
        ("float", "unsupported image mode F"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path: Path, name: str, message: str) -> None:
    path = bad_files(tmp_path)[name]
    with pytest.raises(UserError) as error:
        open_image(path)
    assert str(path) in error.value.message
    assert message in error.value.message
    assert "\n" not in error.value.message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.png: cannot read"):
        open_image(tmp_path / "missing.png")


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_open_image_applies_the_exif_orientation(tmp_path: Path, orientation: int) -> None:
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 250  # bright left half as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "tagged.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    image = open_image(path)

    pixels = np.asarray(image, dtype=float)
    expected = {3: (40, 20), 6: (20, 40), 8: (20, 40)}[orientation]  # 180°, 90° clockwise, 90° anticlockwise
    assert image.size == expected
    bright = {3: pixels[:, 20:], 6: pixels[:20], 8: pixels[20:]}[orientation]
    assert bright.mean() > 200 and pixels.mean() < 150
