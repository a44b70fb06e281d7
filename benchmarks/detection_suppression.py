"""The detection export's suppression on a batch: one image at a time (`tf.map_fn`, as the export suppressed before
keras-hub's detector was subclassed: its suppression needs a static batch) against the whole batch in one op.

    python benchmarks/detection_suppression.py [--batch 16] [--side 640] [--classes 80] [--repeats 21]

Both run `bit_keras.detection.retinanet.PerClassSuppression` (the paper's per-class suppression) on the same random
box deltas and class logits of a RetinaNet's anchors at `--side` (P3-P7, 9 anchors a location), inside one
`tf.function` each; the two alternate (A B, then B A) every repetition. Prints the median milliseconds of each,
their ratio, and whether both kept the same detections.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the benchmarks package

from benchmarks.harness import positive_int

WAYS = ("one image at a time (tf.map_fn)", "the whole batch in one op")


def suppressions(batch, side, classes):
    """`(boxes, logits, {way: tf.function})` on random predictions for `batch` images of `side` pixels."""
    import numpy as np
    import tensorflow as tf

    from bit_keras.detection.retinanet import PerClassSuppression

    anchors = sum(9 * (side // 2**level) ** 2 for level in range(3, 8))
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 0.8, (batch, anchors, 2)).astype(np.float32)
    boxes = tf.constant(np.concatenate([corner, corner + rng.uniform(0.02, 0.2, (batch, anchors, 2))], -1))
    logits = tf.constant(rng.normal(-4.0, 1.5, (batch, anchors, classes)).astype(np.float32))
    suppress = PerClassSuppression()

    @tf.function
    def per_image(boxes, logits):
        def one(pair):
            found = suppress(pair[0][None], pair[1][None])
            return {key: value[0] for key, value in found.items()}

        spec = {
            "boxes": tf.TensorSpec([suppress.max_detections, 4], tf.float32),
            "confidence": tf.TensorSpec([suppress.max_detections], tf.float32),
            "labels": tf.TensorSpec([suppress.max_detections], tf.int32),
            "num_detections": tf.TensorSpec([], tf.int32),
        }
        return tf.map_fn(one, (boxes, logits), fn_output_signature=spec)

    @tf.function
    def whole_batch(boxes, logits):
        return suppress(boxes, logits)

    return boxes, logits, dict(zip(WAYS, (per_image, whole_batch)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=16, help="images per call (default 16)")
    parser.add_argument("--side", type=positive_int, default=640, help="image side in pixels (default 640)")
    parser.add_argument("--classes", type=positive_int, default=80, help="classes (default 80, COCO's)")
    parser.add_argument("--repeats", type=positive_int, default=21, help="timed calls of each (default 21)")
    args = parser.parse_args(argv)
    import numpy as np

    boxes, logits, functions = suppressions(args.batch, args.side, args.classes)
    outputs = {way: function(boxes, logits) for way, function in functions.items()}  # traced and warmed up
    same = all(
        np.array_equal(np.asarray(outputs[WAYS[0]][key]), np.asarray(outputs[WAYS[1]][key]))
        for key in ("labels", "num_detections")
    )
    times = {way: [] for way in WAYS}
    for repeat in range(args.repeats):
        for way in WAYS if repeat % 2 == 0 else WAYS[::-1]:
            start = time.perf_counter()
            np.asarray(functions[way](boxes, logits)["boxes"])
            times[way].append(time.perf_counter() - start)
    medians = {way: 1000 * float(np.median(values)) for way, values in times.items()}
    print(f"batch {args.batch}, {args.side}px ({int(boxes.shape[1]):,} anchors), {args.classes} classes:")
    for way, ms in medians.items():
        print(f"  {way}: {ms:.1f} ms")
    print(f"  ratio: {medians[WAYS[0]] / medians[WAYS[1]]:.2f}x; same detections: {same}")


if __name__ == "__main__":
    main()
