"""Image files: the header check that names an unreadable file before a run starts, and decoding datasets."""

import struct

import tensorflow as tf
from PIL import Image

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # those of IMAGE_EXTENSIONS: Pillow alone would also open WebP, TIFF, ...


def files_dataset(files, labels):
    """A decoding dataset over image files (headers checked first) and their common (height, width), or None."""
    sizes = {image_size(f) for f in files}
    size = sizes.pop() if len(sizes) == 1 else None
    shape = (*size, 3) if size else (None, None, 3)

    def load(file, label):
        image = tf.io.decode_image(tf.io.read_file(file), channels=3, expand_animations=False)
        return tf.ensure_shape(image, shape), label

    slices = (tf.constant(files, tf.string), tf.constant(labels, tf.int64))
    return tf.data.Dataset.from_tensor_slices(slices).map(load, num_parallel_calls=AUTOTUNE), size


def undecodable(files):
    """The files among `files` that TensorFlow fails to decode as images (a parallel pass over all of them)."""
    names = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string))
    decoded = names.map(
        lambda f: (f, tf.shape(tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False))),
        num_parallel_calls=AUTOTUNE,
    )
    good = {f.decode() for f, _ in decoded.ignore_errors().as_numpy_iterator()}
    return [f for f in files if f not in good]


def image_size(path):
    """`(height, width)` that TensorFlow will decode `path` to, from its header as Pillow reads it (GIF and BMP by
    TensorFlow's own rules); ValueError naming `path` if that is no JPEG, PNG, GIF or BMP header TensorFlow takes."""
    with open(path, "rb") as f:
        try:
            with Image.open(f, formats=_FORMATS) as image:  # given a file object, Pillow leaves it open for below
                kind, size = image.format, image.size[::-1]
        except Image.DecompressionBombError as e:  # Pillow's own pixel limit, not a bad header: say so
            raise ValueError(f"{path}: {e}") from None
        except (OSError, ValueError):  # not one of _FORMATS, or a broken header
            kind = size = None
        if kind == "GIF":
            size = _gif_size(f)
        elif kind == "BMP":
            size = _bmp_size(f)
    if not size or 0 in size:
        raise ValueError(f"{path}: not a readable JPEG, PNG, GIF or BMP image (checked by its header)")
    return size


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
