"""onnxruntime on BiT's ONNX file: group norms as the GroupNormalization op against tf2onnx's primitive ops.

    python benchmarks/onnx_group_norm.py [--arch R50x1] [--size 224] [--batch 1 8] [--repeats 21]

Converts a randomly initialized architecture (1000 classes, a random head) once, as `export(format="onnx")` does:
`formats.onnx_model` (group norms as primitive ops: the "before") and `formats.fuse_group_norms` on it (the
GroupNormalization op, then Relu: what the export writes where onnxruntime matches the Keras model). Then times an
onnxruntime CPU session of each file on random images at each batch, the two alternating (A B, then B A) every
repetition, and prints the medians, their ratio and each file's largest difference from the Keras model.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the benchmarks package

from benchmarks.harness import positive_int

FORMS = ("primitive ops", "GroupNormalization")


def convert(arch, size):
    """`(serve, {form: ONNX model})`: the serving function of `arch` at side `size` and its two conversions."""
    import numpy as np
    import tensorflow as tf

    import bit_keras
    from bit_keras.models.layers import portable_ops
    from bit_keras.serving import formats

    model = bit_keras.create_model(arch, num_classes=1000)
    head = model.output_dense  # zero-initialized, as BiT's: logits of 0 would hide any difference
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.01, head.kernel.shape).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def serve(images):
        logits = model(images, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    with portable_ops():  # what the export traces
        primitive = formats.onnx_model(serve)
    return serve, dict(zip(FORMS, (primitive, formats.fuse_group_norms(primitive))))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--arch", default="R50x1", help="architecture, randomly initialized")
    p.add_argument("--size", type=positive_int, default=224, help="image side")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8], help="batch sizes timed")
    p.add_argument("--repeats", type=positive_int, default=21, help="timed runs of each file per batch")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime's intra-op threads (0: its default)")
    args = p.parse_args(argv)
    import collections

    import numpy as np
    import onnxruntime

    serve, models = convert(args.arch, args.size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {
        form: onnxruntime.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for form, m in models.items()
    }
    print(
        f"## onnxruntime {onnxruntime.__version__} (CPU, {args.threads or 'default'} threads, {os.cpu_count()} "
        f"logical CPUs): {args.arch} at {args.size}px, random weights, opset 21\n"
    )
    print("| file | nodes | GroupNormalization | Transpose |\n|---|---|---|---|")
    for form, m in models.items():
        ops = collections.Counter(node.op_type for node in m.graph.node)
        print(f"| {form} | {len(m.graph.node)} | {ops['GroupNormalization']} | {ops['Transpose']} |")
    print(
        f"\n| batch | {FORMS[0]}, ms | {FORMS[1]}, ms | {FORMS[0]} / {FORMS[1]} | largest logit difference from "
        f"Keras / largest logit: {FORMS[0]}, {FORMS[1]} |\n|---|---|---|---|---|"
    )
    rng = np.random.default_rng(0)
    for batch in args.batch:
        images = rng.uniform(size=(batch, args.size, args.size, 3)).astype(np.float32)
        expected = serve(images)["logits"].numpy()
        diffs = {}
        for form, session in sessions.items():  # also the untimed first run
            got = session.run(["logits"], {"images": images})[0]
            diffs[form] = np.abs(got - expected).max() / np.abs(expected).max()
        times = {form: [] for form in FORMS}
        for repeat in range(args.repeats):
            for form in FORMS[:: 1 if repeat % 2 == 0 else -1]:
                start = time.perf_counter()
                sessions[form].run(["logits"], {"images": images})
                times[form].append(time.perf_counter() - start)
        before, after = (1000 * float(np.median(times[form])) for form in FORMS)
        print(
            f"| {batch} | {before:.1f} | {after:.1f} | {before / after:.2f}x | "
            f"{diffs[FORMS[0]]:.1e}, {diffs[FORMS[1]]:.1e} |",
            flush=True,
        )
    print(f"\n(medians of {args.repeats} runs of each file, the two alternating)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
