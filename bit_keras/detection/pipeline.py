"""The detection input pipeline: images resized to the detector's square input, random horizontal flips and scale
jitter with boxes moved and clipped alike, and the anchors' training targets.

Images are resized to `size` x `size` without keeping their aspect ratio (as SSD does): normalized box
coordinates are then the same in the original image, so predictions need no mapping back. The augmentation is
our own, not Keras' bounding-box layers, because an exact resume needs it stateless: a pure function of the
example's position in the stream (`bit_keras.data.pipeline.example_stream`).
"""

import tensorflow as tf

from bit_keras.data.pipeline import example_seed, example_stream
from bit_keras.detection.retinanet import BACKGROUND

AUTOTUNE = tf.data.AUTOTUNE
SCALE_JITTER = (0.8, 1.25)  # the image is resized by a random factor in this range, then cropped or padded back
MAX_BOXES = 100  # boxes per image kept for matching (COCO has at most 93 non-crowd objects per image)
MIN_SIDE = 2.0  # boxes narrower or lower than this (pixels) after clipping are dropped


def train_batches(dataset, encoder, size, batch_size, seed=0, start_step=0, scale_jitter=SCALE_JITTER):
    """`(images float32 [batch_size, size, size, 3] in [0, 1], targets)` batches for training, from `start_step` on
    (see `bit_keras.data.pipeline.train_batches` for the stream); `encoder` is `retinanet.paper_label_encoder()`."""
    low, high = scale_jitter

    def augment(example, position):
        flip_seed, scale_seed, offset_seed = tf.unstack(
            tf.random.experimental.stateless_split(example_seed(seed, position), 3)
        )
        image = tf.image.resize(tf.image.convert_image_dtype(example["image"], tf.float32), (size, size))
        boxes = example["boxes"]
        if tf.random.stateless_uniform([], flip_seed) < 0.5:
            image = tf.image.flip_left_right(image)
            boxes = tf.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], axis=1)
        scaled = tf.cast(tf.round(size * tf.random.stateless_uniform([], scale_seed, low, high)), tf.int32)
        image = tf.image.resize(image, (scaled, scaled))
        # The scaled image's offset in the output: negative (a crop) when larger, positive (a pad) when smaller.
        room = size - scaled
        offset = tf.random.stateless_uniform(
            [2], offset_seed, tf.minimum(room, 0), tf.maximum(room, 0) + 1, dtype=tf.int32
        )
        crop = tf.maximum(-offset, 0)
        image = tf.image.crop_to_bounding_box(
            image, crop[0], crop[1], tf.minimum(scaled, size), tf.minimum(scaled, size)
        )
        pad = tf.maximum(offset, 0)
        image = tf.image.pad_to_bounding_box(image, pad[0], pad[1], size, size)
        shift = tf.cast(tf.tile(offset, [2]), tf.float32)
        boxes = tf.clip_by_value(boxes * tf.cast(scaled, tf.float32) + shift, 0.0, float(size))
        return image, _kept(boxes, example["classes"])

    batches = example_stream(dataset, batch_size, seed, start_step).map(augment, num_parallel_calls=AUTOTUNE)
    return _encoded(batches.batch(batch_size, drop_remainder=True), encoder)


def eval_batches(dataset, encoder, size, batch_size):
    """`(images, targets)` batches of the test set for the evaluation loss; the last batch may be smaller."""

    def prepare(example):
        image = tf.image.resize(tf.image.convert_image_dtype(example["image"], tf.float32), (size, size))
        return image, _kept(example["boxes"] * float(size), example["classes"])

    batches = dataset.map(prepare, num_parallel_calls=AUTOTUNE)
    return _encoded(batches.batch(batch_size), encoder)


def _kept(boxes, classes):
    """Pixel boxes of at least `MIN_SIDE` on each side and their classes (float32), padded to `MAX_BOXES` with
    zero-area boxes of the background class (they match no anchor)."""
    keep = tf.logical_and(boxes[:, 2] - boxes[:, 0] >= MIN_SIDE, boxes[:, 3] - boxes[:, 1] >= MIN_SIDE)
    boxes, classes = tf.boolean_mask(boxes, keep)[:MAX_BOXES], tf.boolean_mask(classes, keep)[:MAX_BOXES]
    count = tf.shape(boxes)[0]
    boxes = tf.pad(boxes, [[0, MAX_BOXES - count], [0, 0]])
    classes = tf.pad(tf.cast(classes, tf.float32), [[0, MAX_BOXES - count]], constant_values=float(BACKGROUND))
    return tf.ensure_shape(boxes, [MAX_BOXES, 4]), tf.ensure_shape(classes, [MAX_BOXES])


def _encoded(batches, encoder):
    """Ground-truth boxes and classes of each batch turned into the anchors' targets by keras-hub's encoder."""

    def encode(images, truth):
        boxes, classes = encoder(images, truth[0], truth[1])
        return images, {"boxes": boxes, "classes": classes}

    return batches.map(encode, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
