"""Interleaved A/B of training-step levers of bit_keras on TensorFlow, beside timm eager, on the CPU.

    python benchmarks/training_levers.py --model R50x1 --resolution 128 --batch 8 \\
        --variants current saved_stats onednn saved_stats+onednn --peers timm

Each variant (a `+`-joined set of the levers in `benchmarks/levers.py`) and each peer runs in a long-lived process
of its own; after every one is built, checked and warmed up, the repetitions run in rounds, one repetition of each
per round in a rotating order, so that all meet the same load. Ratios are medians of the rounds' paired ratios.
Each variant's gradients on one fixed batch (random head) are compared with `current`'s. `--census` counts what
oneDNN runs during one step (`ONEDNN_VERBOSE=1`). See benchmarks/README.md, "Training levers (CPU)".
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # bit_keras needs it; the workers inherit it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the benchmarks package

from benchmarks import harness, interleave, levers
from benchmarks.peers import bit_keras_tf, timm_eager

PEERS = {"timm": True, "timm_nchw": False}  # timm eager, channels-last or contiguous NCHW memory format
TOLERANCE = 1e-5  # the largest relative gradient deviation from `current` a kept variant may have


def parse_args(argv):
    p = harness.OneLineErrors(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="R50x1", help="BiT architecture (random init)")
    p.add_argument("--batch", type=harness.positive_int, default=8, help="training batch")
    p.add_argument("--resolution", type=harness.positive_int, default=128, help="training image size")
    p.add_argument("--num_classes", type=harness.positive_int, default=1000, help="classes of the head")
    p.add_argument("--variants", nargs="+", default=["current", "saved_stats"], help=variants_help())
    p.add_argument("--peers", nargs="*", choices=sorted(PEERS), default=["timm"], help="timm eager peers")
    p.add_argument("--steps", type=harness.positive_int, default=2, help="training steps per repetition")
    harness.add_repetition_flags(p, "rounds (repetitions of each)", "untimed steps after the first", "threads")
    p.add_argument("--census", action="store_true", help="count oneDNN's primitives in one step instead of timing")
    p.add_argument("--timeout", type=harness.positive_int, default=900, help="seconds allowed to each answer")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for spec in args.variants:
        try:
            levers.settings(spec)
        except ValueError as e:
            p.error(f"--variants: {e}")
    return args


def variants_help():
    lines = [f"  {name}: {text}" for name, (text, _) in levers.LEVERS.items()]
    return "variants, each a '+'-joined set of levers (current: none):\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- workers


def keras_worker(args):
    """A bit_keras `Trainer` of the variant `args.worker`: setup (gradients saved for the check, first step, warm-up),
    then timed repetitions of its train function (`fit`'s steps)."""
    import contextlib

    options = levers.settings(args.worker)
    bit_keras_tf.set_threads(args.threads)
    import keras
    import numpy as np
    import tensorflow as tf

    from bit_keras.models import zoo
    from bit_keras.models.layers import portable_ops
    from bit_keras.training import hyperrule
    from bit_keras.training.trainer import Trainer

    traced = portable_ops if options.portable else contextlib.nullcontext

    def setup():
        start = time.perf_counter()
        keras.utils.set_random_seed(0)
        model = zoo.create_model(args.model, num_classes=args.num_classes)
        head = model.output_dense  # BiT heads start at zero: a random one lets gradients reach the body
        rng = np.random.default_rng(1)
        head.kernel.assign(rng.normal(0, head.kernel.shape[0] ** -0.5, head.kernel.shape).astype(np.float32))
        model = levers.rebuild(model, options)
        trainer = Trainer(model)
        trainer.compile_sgd(hyperrule.scaled_lr(args.batch), hyperrule.MOMENTUM, jit_compile=options.step_jit)
        images, labels = harness.random_batch(args.batch, args.resolution, args.num_classes)
        images, targets = tf.constant(images), tf.one_hot(labels, args.num_classes)
        build_s = time.perf_counter() - start
        variables = trainer.trainable_variables
        gradients = tf.function(
            lambda: trainer._loss_and_gradients(images, targets, variables)[:2], jit_compile=options.step_jit
        )
        with traced():
            loss, grads = gradients()
        path = os.path.join(args.worker_dir, f"{os.getpid()}.npz")
        np.savez(path, **{v.path: g.numpy() for v, g in zip(variables, grads)})
        iterator = iter(tf.data.Dataset.from_tensors((images, targets)).repeat())  # as `fit` feeds its steps
        trainer.make_train_function()
        step = lambda: float(trainer.train_function(iterator)["loss"])  # waits for the step
        start = time.perf_counter()
        with traced():
            step()
        first_step_s = time.perf_counter() - start
        for _ in range(args.warmup):
            step()
        state["step"] = step
        return {"build_s": build_s, "first_step_s": first_step_s, "loss": float(loss), "gradients": path}

    state = {}
    return setup, lambda: interleave.timed_steps(state["step"], args.steps)


def timm_worker(args):
    """timm eager's training step (SGD momentum, as the CPU benchmark's peer) in the peer's memory format."""
    from bit_keras.training import hyperrule

    state = {}

    def setup():
        timm_eager.setup(args.threads)
        model, name = timm_eager.build(args.model, args.num_classes)
        images, labels = harness.random_batch(args.batch, args.resolution, args.num_classes)
        model, images, labels = timm_eager.placed(model, images, labels, "cpu", PEERS[args.worker], training=True)
        rate, momentum = hyperrule.scaled_lr(args.batch), hyperrule.MOMENTUM
        state["step"] = timm_eager.training_step(model, model, images, labels, "float32", rate, momentum, "cpu")
        start = time.perf_counter()
        state["step"]()
        first_step_s = time.perf_counter() - start
        for _ in range(args.warmup):
            state["step"]()
        return {"first_step_s": first_step_s, "model": name}

    return setup, lambda: interleave.timed_steps(state["step"], args.steps)


def worker_env(spec, census):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if spec not in PEERS:
        env.update(levers.settings(spec).env)
    if census:
        env["ONEDNN_VERBOSE"] = "1"
    return env


# ----------------------------------------------------------------------------- the parent


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        make = timm_worker if args.worker in PEERS else keras_worker
        return interleave.serve(*make(args))
    names = list(dict.fromkeys(args.variants + args.peers))
    packages = ["tensorflow", "keras", "numpy"] + (["torch", "timm"] if args.peers else [])
    results = {"machine": harness.machine_info(), "versions": harness.package_versions(packages)}
    results["settings"] = {k: v for k, v in vars(args).items() if not k.startswith("worker")}
    results["runs"] = runs = {name: {} for name in names}
    with tempfile.TemporaryDirectory() as folder:
        workers = {}
        try:
            for name in names:
                print(f"starting {name} ...", file=sys.stderr, flush=True)
                worker_args = [*argv, "--worker", name, "--worker_dir", folder]
                worker = interleave.Worker(__file__, worker_args, worker_env(name, args.census))
                runs[name]["setup"] = answer = worker.ask(None, args.timeout)
                if "error" in answer:
                    print(f"  {name} failed: {answer['error']}", file=sys.stderr)
                    worker.kill()
                    continue
                workers[name] = worker
            check_gradients(runs)
            if args.census:
                census(workers, runs, args.timeout)
            else:
                rounds(workers, runs, args, results)
        finally:
            for name, worker in workers.items():
                runs[name]["end"] = worker.close()
    results["machine"]["load_average_end"] = os.getloadavg()
    print(markdown(results, args))
    if args.json:
        harness.write_json(args.json, results)
    return 1 if any("error" in run.get("setup", {}) or "error" in run for run in runs.values()) else 0


def check_gradients(runs):
    """Each variant's gradients on the fixed batch against current's: ||g - g_current|| / ||g_current|| over all of
    them (the criterion), and the worst variable's max |g - g_current| / max |g_current|."""
    import numpy as np

    reference = runs.get("current", {}).get("setup", {}).get("gradients")
    if not reference:
        return
    expected = dict(np.load(reference))
    norm = np.sqrt(sum(np.sum(np.square(e, dtype=np.float64)) for e in expected.values()))
    for run in runs.values():
        path = run["setup"].get("gradients")
        if not path:
            continue
        actual = dict(np.load(path))
        if actual.keys() != expected.keys():
            run["gradient_check"] = {"error": "the variables differ from current's"}
            continue
        differences = {k: actual[k].astype(np.float64) - e for k, e in expected.items()}
        relative = float(np.sqrt(sum(np.sum(np.square(d)) for d in differences.values())) / norm)
        worst = {k: float(np.abs(d).max() / max(np.abs(expected[k]).max(), 1e-30)) for k, d in differences.items()}
        name = max(worst, key=worst.get)
        run["gradient_check"] = {"relative": relative, "within": relative <= TOLERANCE}
        run["gradient_check"] |= {"worst_variable": name, "worst_variable_max_abs": worst[name]}


def rounds(workers, runs, args, results):
    """`args.repeats` rounds, each one repetition of every worker, the order rotated every round."""
    names = list(workers)
    results["load_average_rounds"] = []
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            answer = workers[name].ask("run", args.timeout)
            runs[name].setdefault("repetitions", []).append(answer)
            if "error" in answer:
                runs[name]["error"] = answer["error"]
        results["load_average_rounds"].append(os.getloadavg())
        print(f"round {r + 1}/{args.repeats} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        names = [n for n in names if "error" not in runs[n]]


def census(workers, runs, timeout):
    """oneDNN's primitives (kind, implementation, propagation) during one step of each worker: count, ms."""
    for name, worker in workers.items():
        worker.ask("run", timeout)  # one repetition: `--steps 1` makes it one step
        table = {}
        for line in worker.skipped:
            fields = line.strip().split(",")
            if "exec" not in fields[:5]:
                continue
            i = fields.index("exec")
            key = " ".join(fields[i + 2 : i + 5])
            count, ms = table.get(key, (0, 0.0))
            table[key] = (count + 1, ms + float(fields[-1]))
        runs[name]["onednn"] = dict(sorted(table.items(), key=lambda item: -item[1][1]))


def paired(runs, numerator, denominator):
    """The median over rounds of numerator's repetition seconds / denominator's."""
    a, b = runs[numerator].get("repetitions", []), runs[denominator].get("repetitions", [])
    ratios = [sum(x["step_s"]) / sum(y["step_s"]) for x, y in zip(a, b) if "step_s" in x and "step_s" in y]
    return statistics.median(ratios) if ratios else None


def markdown(results, args):
    runs, machine = results["runs"], results["machine"]
    start, end = machine["load_average_start"][0], machine["load_average_end"][0]
    load = f"load average {start:.2f} at the start, {end:.2f} at the end"
    lines = [
        f"## Training levers: {args.model}, batch {args.batch}, {args.resolution} px, {args.threads} threads, "
        f"{args.repeats} rounds of {args.steps} steps",
        "",
        f"{machine['cpu']}, {machine['usable_cpus']} usable CPUs; {load}.",
        "",
    ]
    if args.census:
        for name, run in runs.items():
            lines.append(f"**{name}**: oneDNN primitives in one step (count, ms)")
            lines += [f"- {key}: {count}, {ms:.1f}" for key, (count, ms) in run.get("onednn", {}).items()] or ["- none"]
        return "\n".join(lines)
    peers = [p for p in args.peers if runs[p].get("repetitions")]
    header = "| variant | ms/step median [min, max] | speed vs current | " + "".join(f"vs {p} | " for p in peers)
    lines += [header + "first step, s | gradients vs current | CPU use | peak RSS, MB |"]
    lines.append("|---" * (header.count("|") + 3) + "|")
    for name, run in runs.items():
        if "error" in run.get("setup", {}) or not run.get("repetitions"):
            lines.append(f"| {name} | failed: {run.get('setup', {}).get('error') or run.get('error')} |")
            continue
        steps = [s * 1e3 for rep in run["repetitions"] for s in rep.get("step_s", [])]
        cpu = [rep["cpu_s"] / (sum(rep["step_s"]) * args.threads) for rep in run["repetitions"] if "cpu_s" in rep]
        ratio = paired(runs, "current", name) if "current" in runs and name not in PEERS else None
        cells = [f"{statistics.median(steps):.0f} [{min(steps):.0f}, {max(steps):.0f}]", fmt(ratio, "x")]
        cells += [fmt(paired(runs, p, name), "x") for p in peers]
        check = run.get("gradient_check", {})
        cells.append(f"{run['setup']['first_step_s']:.1f}")
        if "relative" in check:
            verdict = "ok" if check["within"] else "over 1e-5"
            cells.append(f"{check['relative']:.1e} ({verdict}; worst variable {check['worst_variable_max_abs']:.0e})")
        else:
            cells.append(check.get("error", ""))
        cells += [f"{statistics.median(cpu):.0%}", fmt(run.get("end", {}).get("peak_rss_mb"), "", ".0f")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Speed ratios: median over rounds of (the other's repetition time / this one's); > 1 is faster.")
    lines.append("Gradients: ||g - g_current|| / ||g_current|| over all variables (worst variable: its max abs / max).")
    return "\n".join(lines)


def fmt(value, suffix, spec=".2f"):
    return "" if value is None else f"{value:{spec}}{suffix}"


if __name__ == "__main__":
    sys.exit(main())
