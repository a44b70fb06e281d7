"""bit_keras on JAX against a plain Keras 3 BiT and timm on one accelerator, in one run.

    python benchmarks/gpu.py --json gpu.json

Measures images/s, ms per step, the first step's seconds (compilation included), peak accelerator memory and MFU of
inference and of a training step (forward, backward, SGD momentum 0.9 on softmax cross-entropy) for each peer:
bit_keras (also with weight standardization folded, for inference, and with autodiff's group norm gradient, for
training), a plain Keras 3 BiT, both as jitted stateless steps on JAX, and timm's BiT eager and under torch.compile;
in fp32 and bf16, at 224 and 480 pixels. Each measurement runs in a fresh process of this script (the hidden
`--worker` flag), so its memory peak and first step are its own, and results are written after every one. On a
machine without a GPU it runs small sizes on JAX's CPU backend. Needs no TensorFlow. See benchmarks/README.md.
"""

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "jax"  # every Keras measurement here runs on JAX
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # else JAX takes 75% of the GPU and its peak means nothing
# bit_keras and the benchmarks package from this working tree, installed or not
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import architecture, harness, report
from benchmarks.architecture import NUM_CLASSES
from benchmarks.peers import bit_keras_jax, keras_jax, plain_keras, timm_compile, timm_eager

INFERENCE_ONLY = ("bit_keras_folded",)
TRAINING_ONLY = ("bit_keras_autodiff",)  # the fast path's hand-written group norm gradient, replaced by autodiff
DTYPES = ("bf16", "fp32")  # in the order measured
POLICIES = {"bf16": "mixed_bfloat16", "fp32": "float32"}  # the Keras dtype policy of each
TASKS = ("training", "inference")
DEVICES = ("auto", "gpu", "cpu")
TIMM_PEERS = ("timm", "timm_compile")
LEARNING_RATE = 0.003  # BiT-HyperRule's base rate
MOMENTUM = 0.9
# Defaults by device: the targets' sizes on a GPU, a smoke-test size on the CPU.
DEVICE_DEFAULTS = {
    "gpu": {"model": "R50x1", "resolutions": [224, 480], "steps": 20, "warmup": 3},
    "cpu": {"model": "R26x0.5", "resolutions": [32], "steps": 2, "warmup": 1},
}
LARGE_RESOLUTION = 224  # above it, the default batches are the HyperRule fine-tuning ones
GPU_BATCHES = {"inference": (128, 32), "training": (64, 32)}  # (up to LARGE_RESOLUTION, above it)
CPU_BATCH = 2
SETTINGS = ("model", "arch", "steps", "warmup", "peak_tflops", "worker_timeout", "budget_s")  # the report's


def parse_args(argv):
    int_range = harness.int_range
    p = harness.OneLineErrors(description="bit_keras on JAX vs plain Keras and timm on one accelerator.")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: gpu if JAX sees one, else cpu")
    p.add_argument("--model", help="BiT architecture or checkpoint name; default R50x1 on GPU, R26x0.5 on CPU")
    p.add_argument(
        "--resolutions", nargs="+", type=int_range(32, 1024), help="image sizes; default 224 480 on GPU, 32 on CPU"
    )
    p.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, help="default: both at the first resolution, bf16 at the others"
    )
    p.add_argument(
        "--tasks", nargs="+", choices=TASKS, help="default: both at the first resolution, training at the others"
    )
    p.add_argument(
        "--peers",
        nargs="+",
        choices=report.PEER_LABELS,
        default=list(report.PEER_LABELS),
        help="bit_keras_folded measures inference only, bit_keras_autodiff training only",
    )
    p.add_argument(
        "--batch", type=int_range(1, 4096), help="inference batch; default 128 up to 224 px, 32 above, 2 on CPU"
    )
    p.add_argument(
        "--train_batch", type=int_range(1, 4096), help="training batch; default 64 up to 224 px, 32 above, 2 on CPU"
    )
    p.add_argument("--steps", type=int_range(1, 10000), help="timed steps; default 20 on GPU, 2 on CPU")
    p.add_argument(
        "--warmup", type=int_range(1, 1000), help="untimed steps first, the compiling one included; 3 on GPU, 1 on CPU"
    )
    p.add_argument("--peak_tflops", type=harness.positive_float, default=790.0, help="peak FLOP/s for MFU, in TFLOP/s")
    p.add_argument("--worker_timeout", type=int_range(1, 3600), default=300, help="seconds per measurement")
    p.add_argument(
        "--budget_s", type=int_range(1, 86400), default=450, help="seconds for all measurements; later ones not run"
    )
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file, after each measurement")
    p.add_argument(
        "--dump_hlo", metavar="DIR", help="write each Keras training step's optimized HLO there (gzip), to read offline"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a measurement's JSON spec, run by the parent
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.dump_hlo and os.path.exists(args.dump_hlo) and not os.path.isdir(args.dump_hlo):
        p.error(f"--dump_hlo: {args.dump_hlo} is a file, not a folder")
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is imported; the workers inherit it
    args.device, args.device_name = resolve_device(args.device)
    if args.device_name is None:
        p.error("--device gpu: JAX sees no GPU")
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.arch, args.block_units, args.width = architecture.architecture(args.model)
    except ValueError as e:
        p.error(f"--model: {e}")
    return args


def resolve_device(choice):
    """`(device, its name)`: "gpu" when asked for or (auto) when JAX sees one, else "cpu"; name None when a GPU was
    asked for and JAX sees none."""
    if choice == "cpu":
        return "cpu", harness.cpu_name()
    import jax

    device = jax.devices()[0]
    if device.platform == "gpu":
        return "gpu", device.device_kind
    return ("gpu", None) if choice == "gpu" else ("cpu", harness.cpu_name())


def default_batch(args, task, resolution):
    given = args.batch if task == "inference" else args.train_batch
    if given:
        return given
    if args.device == "cpu":
        return CPU_BATCH
    return GPU_BATCHES[task][resolution > LARGE_RESOLUTION]


def plan(args, peers):
    """The measurements, in order: bf16 before fp32 (the targets are bf16's), then by resolution, training before
    inference, then by peer. Without `--dtypes` and `--tasks`, the resolutions after the first get bf16 training
    alone (480 px: the HyperRule's fine-tuning)."""
    measurements = []
    for dtype in (d for d in DTYPES if d in (args.dtypes or DTYPES)):
        for index, resolution in enumerate(args.resolutions):
            tasks = args.tasks or TASKS
            if index > 0 and not (args.dtypes or args.tasks):
                tasks = ("training",) if dtype == "bf16" else ()
            for task in (t for t in TASKS if t in tasks):
                for peer in peers:
                    if peer in (INFERENCE_ONLY if task == "training" else TRAINING_ONLY):
                        continue
                    batch = default_batch(args, task, resolution)
                    measurements.append(dict(peer=peer, dtype=dtype, task=task, resolution=resolution, batch=batch))
    return measurements


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return harness.run_worker(lambda: measurement(json.loads(args.worker)), args.worker_out)
    peers, missing = available_peers(args.peers)
    measurements = plan(args, peers)
    forward_flops = {r: architecture.forward_flops_per_image(args.arch, r) for r in args.resolutions}
    results = {
        "command": shlex.join(sys.orig_argv),
        "device": {"kind": args.device, "name": args.device_name},
        "versions": harness.package_versions(("jax", "jaxlib", "keras", "numpy", "torch", "timm")),
        "settings": {key: getattr(args, key) for key in SETTINGS},
        "forward_flops_per_image": forward_flops,
        "not_installed": missing,
        "results": [],
    }
    print(report.gpu_header(results, measurements), flush=True)
    common = dict(arch=args.arch, block_units=args.block_units, width=args.width, device=args.device)
    common |= dict(steps=args.steps, warmup=args.warmup, dump_hlo=args.dump_hlo and os.path.abspath(args.dump_hlo))
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_benchmark_jax_cache_") as jax_cache:
        for number, spec in enumerate(measurements, start=1):
            print(f"[{number}/{len(measurements)}] {report.describe(spec)}: ", end="", flush=True)
            left = args.budget_s - (time.perf_counter() - start)
            if left <= 0:
                result = {"not_run": f"the time budget (--budget_s {args.budget_s}) was spent"}
            else:
                result = measure({**spec, **common}, min(args.worker_timeout, left), jax_cache)
            flops = architecture.task_flops(forward_flops[spec["resolution"]], spec["task"])
            result = {**spec, **result, "flops_per_image": flops}
            if "images_per_s" in result and args.device == "gpu":
                result["mfu"] = result["images_per_s"] * flops / (args.peak_tflops * 1e12)
            results["results"].append(result)
            print(report.progress(result), flush=True)
            if "error" in result:
                print("\n".join(result["stderr_tail"]), file=sys.stderr, flush=True)
            if args.json:
                harness.write_json(args.json, results)
    print(report.gpu_summary(results), flush=True)
    failed = [r for r in results["results"] if "error" in r]
    if failed:
        print(f"error: {len(failed)} measurement(s) failed", file=sys.stderr)
    return 1 if failed else 0


def available_peers(requested):
    """`(the requested peers that can run, {peer: why not})`: timm's need torch and timm installed."""
    missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
    unavailable = {
        p: f"not installed ({' and '.join(missing)} missing)" for p in requested if missing and p in TIMM_PEERS
    }
    return [p for p in requested if p not in unavailable], unavailable


def measure(spec, timeout, jax_cache):
    """Run one measurement in a fresh process of this script; its result, or `{"error": its last error line}`.

    JAX's persistent compilation cache (`jax_cache`, shared by the run's workers) serves the model-building
    computations (random initializers) compiled by earlier workers; the worker writes nothing to it once the model
    is built, and XLA's autotuning results are not cached, so every measured step compiles from scratch. torch.compile
    gets empty caches of its own for the same reason."""
    with tempfile.TemporaryDirectory() as folder:
        env = dict(
            os.environ,
            JAX_COMPILATION_CACHE_DIR=jax_cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="none",
            TORCHINDUCTOR_CACHE_DIR=os.path.join(folder, "inductor"),
            TRITON_CACHE_DIR=os.path.join(folder, "triton"),
        )
        arguments = ["--worker", json.dumps(spec)]
        return harness.measure_in_fresh_process(__file__, arguments, timeout, "--worker_timeout, --budget_s", env)


# ----------------------------------------------------------------------------- workers (one per process)


def measurement(spec):
    """Measure `spec` in this (fresh) process: the timed steps, the peak memory and the parameter count."""
    schedule = harness.Schedule(spec["warmup"], spec["steps"])
    images, labels = harness.random_batch(spec["batch"], spec["resolution"], NUM_CLASSES)
    measure_peer = timm_measurement if spec["peer"] in TIMM_PEERS else keras_measurement
    return measure_peer(spec, POLICIES[spec["dtype"]], schedule, images, labels)


def keras_measurement(spec, policy, schedule, images, labels):
    import jax
    import keras

    keras.mixed_precision.set_global_policy(policy)  # before the model is built
    if spec["peer"] == "plain_keras":
        model = plain_keras.build(spec["block_units"], spec["width"], NUM_CLASSES)
    else:
        model = bit_keras_jax.build(spec["arch"], NUM_CLASSES, folded=spec["peer"] == "bit_keras_folded")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # the measured step: not cached
    images, labels = keras_jax.device_batch(images, labels)
    if spec["task"] == "training":
        optimizer, state = keras_jax.training_state(model, LEARNING_RATE, MOMENTUM)
        autodiff = spec["peer"] == "bit_keras_autodiff"
        tracing = bit_keras_jax.autodiff_group_norm if autodiff else contextlib.nullcontext
        start = time.perf_counter()
        step, lowered, compiled = keras_jax.training_step(model, optimizer, state, images, labels, tracing)
        result = harness.median_step(start, harness.step_ends(step, schedule.calls), schedule, spec["batch"])
        optimized = compiled.as_text()
        if spec["dump_hlo"]:
            name = f"{spec['peer']}-{spec['dtype']}-{spec['resolution']}px-batch{spec['batch']}.hlo.txt.gz"
            with gzip.open(os.path.join(spec["dump_hlo"], name), "wt", encoding="utf-8") as f:
                f.write(optimized)
        result |= keras_jax.dtype_audit(lowered.as_text()) | keras_jax.compiled_audit(optimized)
    else:
        start = time.perf_counter()
        step = keras_jax.inference_step(model, images)
        result = harness.median_step(start, harness.step_ends(step, schedule.calls), schedule, spec["batch"])
        if spec["peer"] == "bit_keras" and spec["dtype"] == "fp32":
            result["float32_precision_deviation"] = bit_keras_jax.float32_precision_deviation(model, images)
    return {**result, **keras_jax.peak_memory(), "params": model.count_params()}


def timm_measurement(spec, policy, schedule, images, labels):
    device = "cuda" if spec["device"] == "gpu" else "cpu"
    training = spec["task"] == "training"
    timm_eager.setup()
    model, _ = timm_eager.build(spec["arch"], NUM_CLASSES)
    model, images, labels = timm_eager.placed(model, images, labels, device, channels_last=True, training=training)
    start = time.perf_counter()
    network = timm_compile.compiled(model) if spec["peer"] == "timm_compile" else model
    if training:
        step = timm_eager.training_step(model, network, images, labels, policy, LEARNING_RATE, MOMENTUM, device)
    else:
        step = timm_eager.inference_step(network, images, policy, device)
    result = harness.median_step(start, harness.step_ends(step, schedule.calls), schedule, spec["batch"])
    return {**result, **timm_eager.peak_memory(device), "params": timm_eager.params(model)}


if __name__ == "__main__":
    sys.exit(main())
