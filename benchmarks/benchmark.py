"""Speed and memory of a bit_keras BiT model on TensorFlow, optionally beside timm's ResNetV2 in the same run.

    python benchmarks/benchmark.py --model R50x1 --json bench.json

Measures inference and training-step images/s (warm-up, then median/min/max of repetitions), the time to
the first training step, peak memory, the input pipeline alone and, under mixed precision, the logits'
distance to float32. Every measurement runs in a fresh subprocess of this script (the hidden `--worker`
flag), so that its peak memory and first-step time are its own. See benchmarks/README.md.
"""

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # bit_keras needs it; the workers inherit it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the benchmarks package

from benchmarks import architecture, harness, report
from benchmarks.peers import bit_keras_tf, timm_eager

DTYPES = ("float32", "mixed_bfloat16", "mixed_float16")
PEERS = ("auto", "timm", "none")
TASKS = ("inference", "folded", "training", "convolutions", "pipeline", "parity")
PEER_INSTALL = "see benchmarks/README.md for the CPU-only install of torch and timm"


def parse_args(argv):
    """The options, with `arch` (the architecture of `--model`) and `schedule` added; bad values exit naming them."""
    from bit_keras.training.strategy import STRATEGIES

    positive_int = harness.positive_int
    p = argparse.ArgumentParser(
        description="Benchmark a bit_keras BiT model (and timm's, side by side).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="R50x1", help="architecture (R50x1, R26x0.5...) or checkpoint name; random init")
    p.add_argument("--num_classes", type=positive_int, default=1000, help="classes of the head")
    p.add_argument("--batch", type=positive_int, default=16, help="inference batch")
    p.add_argument("--resolution", type=positive_int, default=224, help="inference image size")
    p.add_argument("--train_batch", type=positive_int, default=8, help="training batch (global)")
    p.add_argument("--train_resolution", type=positive_int, default=128, help="training crop size")
    p.add_argument("--steps", type=positive_int, default=2, help="batches per timed repetition")
    first = "untimed batches first (the first one traces)"
    harness.add_repetition_flags(p, "timed repetitions", first, "intra- and inter-op threads of TF and torch")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="Keras dtype policy (timm: torch.autocast)")
    p.add_argument("--xla", action="store_true", help="compile bit_keras's steps with XLA (jit_compile=True)")
    p.add_argument(
        "--strategy", choices=STRATEGIES, default="auto", help="bit_keras.training.strategy.make_strategy name"
    )
    p.add_argument("--cpu_devices", type=positive_int, default=1, help="logical CPU devices (replicas of 'mirrored')")
    p.add_argument("--peer", choices=PEERS, default="auto", help="auto: timm when installed")
    p.add_argument("--pipeline_images", type=int, default=320, help="JPEGs for the input-pipeline test; 0 skips it")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to measure")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds allowed to each measurement")
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # FRAMEWORK:TASK, run by the parent in a fresh process
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.arch = architecture.architecture(args.model)[0]
    except ValueError as e:
        p.error(f"--model: {e}")
    if args.pipeline_images < 0:
        p.error(f"--pipeline_images must be >= 0, got {args.pipeline_images}")
    if args.worker and args.worker not in WORKERS:
        p.error(f"--worker must be one of {sorted(WORKERS)}, got {args.worker!r}")
    args.schedule = harness.Schedule(args.warmup, args.repeats, args.steps)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        measure = lambda: {**WORKERS[args.worker](args), "peak_rss_mb": harness.peak_rss_mb()}
        return harness.run_worker(measure, args.worker_out)
    peer, peer_note = resolve_peer(args.peer)
    packages = ["tensorflow", "keras", "bit-keras", "numpy"] + (["torch", "torchvision", "timm"] if peer else [])
    results = {
        "machine": harness.machine_info(),
        "versions": harness.package_versions(packages),
        "settings": {**settings(args), "peer": peer, "peer_note": peer_note},
        "bit_keras": {},
    }
    if peer:
        results[peer] = {}
    for framework, task in plan(args, peer):
        print(f"measuring {framework}:{task} ...", file=sys.stderr, flush=True)
        arguments = [*argv, "--worker", f"{framework}:{task}"]
        result = harness.measure_in_fresh_process(__file__, arguments, args.timeout, "--timeout")
        if "error" in result:
            print("\n".join(result["stderr_tail"]), file=sys.stderr)
        results[framework][task] = result
    results["machine"]["load_average_end"] = os.getloadavg()
    print(report.cpu_markdown(results, bit_keras_tf.PIPELINE_SIZES))
    if args.json:
        harness.write_json(args.json, results)
        print(f"wrote {args.json}", file=sys.stderr)
    failed = report.failures(results)
    if failed:
        print(f"error: {len(failed)} measurement(s) failed, see the report", file=sys.stderr)
    return 1 if failed else 0


def resolve_peer(choice):
    """`(peer or None, a note on why none)` for `--peer`; `--peer timm` without timm installed exits."""
    if choice == "none":
        return None, "none (--peer none)"
    if timm_eager.installed():
        return "timm", None
    if choice == "timm":
        sys.exit(f"error: --peer timm, but torch and timm are not both installed: {PEER_INSTALL}")
    note = f"none: timm is not installed ({PEER_INSTALL})"
    print(f"note: no peer measured; {note}", file=sys.stderr)
    return None, note


def plan(args, peer):
    """`(framework, task)` pairs to measure, in order."""
    pairs = []
    for task in ("inference", "training", "convolutions"):
        if task in args.tasks:
            pairs.append(("bit_keras", task))
            if peer:
                pairs.append((peer, task))
        if task == "inference" and "folded" in args.tasks:
            pairs.append(("bit_keras", "folded"))
    if args.pipeline_images and "pipeline" in args.tasks:
        pairs.append(("bit_keras", "pipeline"))
    if args.dtype != "float32" and "parity" in args.tasks:
        pairs.append(("bit_keras", "parity"))
    return pairs


def settings(args):
    keys = (
        "model arch num_classes batch resolution train_batch train_resolution repeats steps warmup dtype xla "
        "strategy cpu_devices threads pipeline_images"
    )
    return {key: getattr(args, key) for key in keys.split()}


# ----------------------------------------------------------------------------- workers (one per process)


def timm_measurement(args, task):
    """timm eager's `task` ("inference" or "training") at the CPU benchmark's settings, in NCHW."""
    from bit_keras.training import hyperrule

    timm_eager.setup(args.threads)
    start = time.perf_counter()
    model, name = timm_eager.build(args.arch, args.num_classes)
    build_s = time.perf_counter() - start
    training = task == "training"
    batch, resolution = (args.train_batch, args.train_resolution) if training else (args.batch, args.resolution)
    images, labels = harness.random_batch(batch, resolution, args.num_classes)
    model, images, labels = timm_eager.placed(model, images, labels, "cpu", channels_last=False, training=training)
    if training:
        rate, momentum = hyperrule.scaled_lr(batch), hyperrule.MOMENTUM
        step = timm_eager.training_step(model, model, images, labels, args.dtype, rate, momentum, "cpu")
    else:
        step = timm_eager.inference_step(model, images, args.dtype, "cpu")
    result = harness.timed_repetitions(step, args.schedule, batch)
    return {**result, "resolution": resolution, "build_s": build_s, "params": timm_eager.params(model), "model": name}


def convolutions(args, steps):
    """Milliseconds of the model's convolutions alone per training step: each one's `steps` (forward and both
    backward passes) timed alone, medians summed."""
    batch = args.train_batch // args.cpu_devices  # what one replica convolves
    problems = architecture.conv_problems(args.arch, batch, args.train_resolution)
    medians = [harness.median_ms(step, args.repeats, args.warmup) for step in steps(problems)]
    return {"step_ms": sum(medians), "convolutions": len(medians), "ms_each": medians}


def keras_convolutions(args):
    bit_keras_tf.set_threads(args.threads, args.cpu_devices)
    return convolutions(args, bit_keras_tf.convolution_steps)


def timm_convolutions(args):
    timm_eager.setup(args.threads)
    return convolutions(args, timm_eager.convolution_steps)


WORKERS = {
    "bit_keras:inference": bit_keras_tf.inference,
    "bit_keras:folded": functools.partial(bit_keras_tf.inference, fold=True),
    "bit_keras:training": bit_keras_tf.training,
    "bit_keras:pipeline": bit_keras_tf.pipeline,
    "bit_keras:parity": bit_keras_tf.parity,
    "timm:inference": functools.partial(timm_measurement, task="inference"),
    "timm:training": functools.partial(timm_measurement, task="training"),
    "bit_keras:convolutions": keras_convolutions,
    "timm:convolutions": timm_convolutions,
}


if __name__ == "__main__":
    sys.exit(main())
