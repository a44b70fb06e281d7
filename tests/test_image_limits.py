"""The pixel limit on user image files, checked from the header (nothing decoded) wherever they are read."""

import io
import json
import os
import re
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from bit_keras.data import images, sources
from bit_keras.data.images import read_image
from bit_keras.detection import data as detection_data
from bit_keras.detection.detect import detect
from bit_keras.serving.predict import predict

SIDE = 20_000  # a 20000x20000 image: 400 megapixels, 1.2 GB as decoded RGB


def _png(width, height):
    """A valid 1-bit grayscale PNG of zeros: a few kB for any size."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(bytes(height * (1 + (width + 7) // 8)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("huge") / "huge.png", _png(SIDE, SIDE))


def _over(path, width, height, limit=images.MAX_PIXELS):
    return re.escape(f"{path}: {width} x {height} = {width * height} pixels is over the limit of {limit}")


def test_huge_png_refused_from_its_header_and_accepted_with_a_raised_limit(huge):
    assert os.path.getsize(huge) < 100_000
    with pytest.raises(ValueError, match=_over(huge, SIDE, SIDE) + r" \(raise it with max_pixels\)$"):
        images.image_size(huge)
    with pytest.raises(ValueError, match=_over(huge, SIDE, SIDE)):
        read_image(huge)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor Pillow's DecompressionBombWarning
        assert images.image_size(huge, max_pixels=SIDE * SIDE) == (SIDE, SIDE)
        images.check_pixel_limit(huge, max_pixels=SIDE * SIDE)
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's own limit is back
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match=re.escape(f"max_pixels must be a positive integer, got {bad!r}")):
            images.image_size(huge, max_pixels=bad)


def test_between_pillows_limit_and_ours_no_warning(tmp_path):
    """9500x9500 is above Pillow's warning threshold (89 megapixels) and under our 100."""
    path = _write(tmp_path / "big.png", _png(9500, 9500))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert images.image_size(path) == (9500, 9500)


def test_image_folder_refuses_a_huge_image(tmp_path, huge):
    for i in range(5):
        _write(tmp_path / "a" / f"{i}.png", _png(4, 4))
        _write(tmp_path / "b" / f"{i}.png", _png(4, 4))
    shutil.copy(huge, tmp_path / "b" / "huge.png")
    path = tmp_path / "b" / "huge.png"
    with pytest.raises(ValueError, match=_over(path, SIDE, SIDE)):
        sources.from_image_folder(str(tmp_path))
    with pytest.raises(ValueError, match=_over(path, SIDE, SIDE)):
        sources.load(image_folder=str(tmp_path))
    d = sources.load(image_folder=str(tmp_path), max_pixels=SIDE * SIDE)  # headers only: nothing decoded yet
    assert str(path) in d.files and d.image_size is None
    with pytest.raises(ValueError, match=r"\.png: 4 x 4 = 16 pixels is over the limit of 15 "):
        sources.from_image_folder(str(tmp_path), max_pixels=15)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer, got 0"):
        sources.load(image_folder=str(tmp_path), max_pixels=0)


def test_gif_is_limited_by_its_frames_not_its_screen(tmp_path):
    """TensorFlow decodes a GIF to its largest frame: a 60000x60000 screen (which Pillow alone calls a
    decompression bomb) around an 8x6 frame is 8x6."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((6, 8), np.uint8)).convert("P").save(out, "GIF")
    gif = bytearray(out.getvalue())
    gif[6:10] = struct.pack("<HH", 60_000, 60_000)
    path = _write(tmp_path / "screen.gif", bytes(gif))
    assert images.image_size(path, max_pixels=48) == (6, 8)
    with pytest.raises(ValueError, match=_over(path, 8, 6, 47)):
        images.image_size(path, max_pixels=47)


def test_read_image_limit_covers_webp_and_reaches_predict_and_detect(tmp_path):
    out = io.BytesIO()
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(out, "WEBP")
    webp = _write(tmp_path / "small.webp", out.getvalue())
    assert read_image(webp) == out.getvalue()
    with pytest.raises(ValueError, match=_over(webp, 20, 10, 199)):
        read_image(webp, max_pixels=199)
    with pytest.raises(ValueError, match=_over(webp, 20, 10, 100)):  # before the model is looked at
        predict("no-such-model", [webp], max_pixels=100)
    with pytest.raises(ValueError, match=_over(webp, 20, 10, 100)):
        detect("no-such-model", [webp], max_pixels=100)
    broken = _write(tmp_path / "broken.png", b"not an image")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):  # TensorFlow's decoding says so
        read_image(broken)


def test_coco_folder_refuses_a_huge_image(tmp_path, huge):
    _write(tmp_path / "images" / "1.png", _png(4, 4))
    shutil.copy(huge, tmp_path / "images" / "0.png")
    coco = {
        "images": [
            {"id": 0, "file_name": "0.png", "width": SIDE, "height": SIDE},
            {"id": 1, "file_name": "1.png", "width": 4, "height": 4},
        ],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": k + 1, "image_id": k, "category_id": 1, "bbox": [0, 0, 2, 2]} for k in (0, 1)],
    }
    _write(tmp_path / "annotations" / "instances_default.json", json.dumps(coco).encode())
    path = tmp_path / "images" / "0.png"
    with pytest.raises(ValueError, match=_over(path, SIDE, SIDE)):
        detection_data.from_coco_folder(str(tmp_path))
    with pytest.raises(ValueError, match=_over(path, SIDE, SIDE)):
        detection_data.load(coco_folder=str(tmp_path))
    d = detection_data.load(coco_folder=str(tmp_path), max_pixels=SIDE * SIDE)
    assert sorted(d.files) == sorted(str(tmp_path / "images" / f) for f in ("0.png", "1.png"))
    with pytest.raises(ValueError, match="max_pixels must be a positive integer, got 1.0"):
        detection_data.from_coco_folder(str(tmp_path), max_pixels=1.0)
