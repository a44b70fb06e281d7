"""Image files: the header check that names an unreadable or oversized file before a run starts, and decoding
datasets."""

import contextlib
import io
import re
import struct
import threading

import tensorflow as tf
from PIL import Image

from bit_keras import files
from bit_keras.checks import arg, check_int
from bit_keras.defaults import MAX_PIXELS  # re-exported: images.MAX_PIXELS

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # those of IMAGE_EXTENSIONS: Pillow alone would also open WebP, TIFF, ...
_DECODABLE = (*_FORMATS, "WEBP")  # what tf.io.decode_image also reads
_PILLOW_LIMIT = threading.Lock()
MAX_FILE_BYTES = 1 << 30  # an image file read whole (predict, detect) is at most this large


def files_dataset(files, labels, max_pixels=MAX_PIXELS):
    """A decoding dataset over image files (headers checked first, `max_pixels` included) and their (height, width)
    sizes, in order."""
    sizes = [image_size(f, max_pixels) for f in files]
    size = common_size(sizes)
    shape = (*size, 3) if size else (None, None, 3)

    def load(file, label):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return tf.ensure_shape(image, shape), label

    slices = (tf.constant(files, tf.string), tf.constant(labels, tf.int64))
    return tf.data.Dataset.from_tensor_slices(slices).map(load, num_parallel_calls=AUTOTUNE), sizes


def common_size(sizes):
    """The (height, width) all of `sizes` share, or None."""
    return sizes[0] if sizes and len(set(sizes)) == 1 else None


def median_size(sizes):
    """The (height, width) of median area among `sizes` (the lower middle one), or None for none: what BiT-HyperRule's
    resolution rule, a rule on the images' area, reads when sizes vary."""
    ordered = sorted(sizes, key=lambda size: (size[0] * size[1], size))
    return tuple(ordered[(len(ordered) - 1) // 2]) if ordered else None


def undecodable(files):
    """The files among `files` that TensorFlow fails to decode as images (a parallel pass over all of them)."""
    names = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string))
    decoded = names.map(
        lambda f: (f, tf.shape(tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False))),
        num_parallel_calls=AUTOTUNE,
    )
    good = {f.decode() for f, _ in decoded.ignore_errors().as_numpy_iterator()}
    return [f for f in files if f not in good]


def read_image(path: str, max_pixels: int = MAX_PIXELS) -> bytes:
    """The bytes of an image file (a regular file of at most `MAX_FILE_BYTES`), checked to be at most `max_pixels`
    pixels by its header, then to decode as an image; a ValueError naming the file otherwise."""
    check_pixel_limit(path, max_pixels)
    data = files.read_regular(path, "images", MAX_FILE_BYTES)
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        reason = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", err.message.splitlines()[0])  # TF's op decorations
        raise ValueError(f"{path}: not a readable image ({reason})") from None
    return data


def image_size(path, max_pixels=MAX_PIXELS):
    """`(height, width)` that TensorFlow will decode `path` to, from its header as Pillow reads it (GIF and BMP by
    TensorFlow's own rules); ValueError naming `path` if that is no JPEG, PNG, GIF or BMP header TensorFlow takes,
    or if it is over `max_pixels` pixels."""
    check_int("max_pixels", max_pixels, required=True)
    size = _header_size(path, _FORMATS)
    if not size or 0 in size:
        raise ValueError(f"{path}: not a readable JPEG, PNG, GIF or BMP image (checked by its header)")
    _check_pixels(path, size, max_pixels)
    return size


def check_pixel_limit(path, max_pixels=MAX_PIXELS):
    """A ValueError naming `path` if its header (any format `tf.io.decode_image` reads) says it is over
    `max_pixels` pixels; a header that does not read passes, for the decoding to name the problem."""
    check_int("max_pixels", max_pixels, required=True)
    if size := _header_size(path, _DECODABLE):
        _check_pixels(path, size, max_pixels)


def _check_pixels(path, size, max_pixels):
    height, width = size
    if height * width > max_pixels:
        raise ValueError(
            f"{path}: {width} x {height} = {width * height} pixels is over the limit of {max_pixels} "
            f"(raise it with {arg('max_pixels')})"
        )


def encoded_size(data: bytes):
    """`(height, width)` that TensorFlow decodes the encoded image `data` to (JPEG, PNG, GIF, BMP), from its header;
    None if it does not read."""
    return _stream_size(io.BytesIO(data), _FORMATS)


def _header_size(path, formats):
    """`(height, width)` of `path` as TensorFlow decodes it, from its header in one of `formats`; None if unreadable."""
    with files.open_regular(path, "images") as f:
        return _stream_size(f, formats)


def _stream_size(f, formats):
    with _no_pillow_limit():
        try:
            with Image.open(f, formats=formats) as image:  # given a file object, Pillow leaves it open for below
                kind, size = image.format, image.size[::-1]
        except (OSError, ValueError):  # not one of `formats`, or a broken header
            return None
        if kind == "GIF":
            return _gif_size(f)
        if kind == "BMP":
            return _bmp_size(f)
    return size


@contextlib.contextmanager
def _no_pillow_limit():
    """Pillow's own pixel limit lifted (a warning above 89 megapixels, an error above twice that, on the header's
    size, a GIF's screen): `max_pixels`, on the size TensorFlow decodes to, replaces it."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _bmp_size(f):
    """TensorFlow's own BMP conditions, which Pillow's header fields don't expose (bits per pixel) and
    which are stricter than Pillow's: 8, 24 or 32 bpp, and a file size of exactly offset + rows."""
    f.seek(10)
    if len(head := f.read(20)) < 20:
        return None
    offset, width, height, bpp = struct.unpack("<i4xii2xh", head)
    row = (bpp // 8 * width + 3) // 4 * 4
    if bpp in (8, 24, 32) and width > 0 and offset >= 0 and f.seek(0, 2) == offset + row * abs(height):
        return (abs(height), width)
    return None


def _gif_size(f):
    """The largest frame width and height, which TensorFlow decodes every frame to; None if truncated. Walked by hand:
    Pillow grows `size` by frame offsets, and shows frame extents and truncation only while decoding the frames."""
    f.seek(10)
    f.seek(2 + _gif_color_table(f.read(1)[0]), 1)  # background colour, aspect ratio, global colour table
    height = width = 0
    while (block := f.read(1)) not in (b"\x3b", b""):  # trailer, or end of file
        if block == b"\x2c":  # image descriptor: left, top, width, height, flags
            desc = f.read(9)
            if len(desc) < 9:
                return None
            frame_width, frame_height = struct.unpack("<HH", desc[4:8])
            width, height = max(width, frame_width), max(height, frame_height)
            f.seek(_gif_color_table(desc[8]) + 1, 1)  # local colour table, LZW code size
        elif block != b"\x21" or not f.read(1):  # extension introducer and label
            return None
        while (length := f.read(1)) not in (b"\x00", b""):  # data sub-blocks
            f.seek(length[0], 1)
        if not length:
            return None
    return (height, width)


def _gif_color_table(flags):
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0
