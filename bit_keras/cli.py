"""`bit-keras`: one subcommand per function (`models`, `convert`, `finetune`, `pretrain`, `finetune-detector`,
`distill`, `fewshot`, `export`, `predict`, `detect`).

The parser is built from `bit_keras.defaults` alone, so that --help, --version and argument errors come without
importing TensorFlow; `models` imports Keras and the zoo, the other subcommands every module (`bit_keras.load`)."""

import argparse
import importlib.metadata
import json
import os
import sys

from bit_keras import checks, defaults, options, startup

# Parsed arguments that are not keyword arguments of the recipe.
TRAINING_FLAGS = ("command", "func", "recipe", "quiet", "verbose")
VERBS = {  # the module of each training verb
    "finetune": "bit_keras.training.finetune",
    "pretrain": "bit_keras.training.pretrain",
    "finetune_detector": "bit_keras.detection.finetune",
    "distill": "bit_keras.training.distill",
}
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
OFFLINE_WEIGHTS = "pass --weights PATH.npz (a local copy of the checkpoint)"  # convert and export, without a network


def _models(args):
    from bit_keras.models import zoo

    rows = [("name", "architecture", "upstream data", "classes", "input", "params (M)", "labels")]
    for entry in zoo.CHECKPOINTS.values():
        params = f"{zoo.parameter_count(entry.arch, entry.num_classes) / 1e6:.1f}"
        rows.append(
            (
                entry.name,
                entry.arch,
                entry.upstream,
                str(entry.num_classes),
                str(entry.input_size),
                params,
                entry.labels,
            )
        )
    if args.architectures:
        for arch in zoo.ARCHITECTURES:
            rows.append((arch, arch, "-", "-", "-", f"{zoo.parameter_count(arch) / 1e6:.1f}", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _convert(args):
    from bit_keras.models.resolve import resolve_model, save_model

    if not args.out.endswith(".keras"):
        raise ValueError(f"--out must end with .keras, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} exists (pass --overwrite to replace it)")
    model = resolve_model(
        args.model,
        weights=args.weights,
        num_classes=args.num_classes,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        offline=OFFLINE_WEIGHTS,
    ).model
    save_model(model, args.out)
    print(
        f"wrote {args.out}: {model.name}, {model.count_params():,} parameters, {model.num_classes or 'no'} head classes"
    )


def _train(args):
    """`finetune`, `pretrain` or `finetune-detector`: the parsed flags are the keyword arguments of the function
    `bit_keras.<args.recipe>`. The result line is printed also when --quiet; a finished run of the same configuration
    is reported, not trained again."""
    import importlib

    from bit_keras.training import engine

    arguments = {k: v for k, v in vars(args).items() if k not in TRAINING_FLAGS}
    verb = getattr(importlib.import_module(VERBS[args.recipe]), args.recipe)
    try:
        result = verb(**arguments, verbose=0 if args.quiet else 1)
    except engine.FinishedRun as finished:
        print(f"{engine.result_line(finished.metrics, finished.run_dir)} (finished before; --overwrite trains again)")
        return
    if args.quiet:
        print(engine.result_line(result.metrics, result.run_dir))


def _add_training(sub, verb, help, description):
    """A training subcommand: the flags of the verb's declared options (`bit_keras.options`) and --quiet."""
    p = sub.add_parser(verb.replace("_", "-"), help=help, description=description)
    options.add_flags(p, verb)
    p.add_argument("--quiet", action="store_true", help="only warnings and errors (the run's train.log has everything)")
    p.set_defaults(func=_train, recipe=verb)


def _add_max_pixels(p):
    """`--max_pixels`, as the training subcommands declare it (`bit_keras.options.RUN`)."""
    options.add_flag(p, next(option for option in options.RUN if option.name == "max_pixels"))


def _add_recipes(sub):
    embedded = ", ".join(f"{k} {v}" for k, v in defaults.FINETUNE_EMBEDDED.items())
    _add_training(
        sub,
        "finetune",
        "fine-tune a BiT model with the BiT-HyperRule",
        "Fine-tune a BiT model on a tfds dataset or an image folder with the BiT-HyperRule. Without --dataset or "
        f"--image_folder: scikit-learn's bundled digits, offline, with {embedded} (each overridable).",
    )
    _add_training(
        sub,
        "pretrain",
        "pretrain a BiT architecture from scratch with the paper's upstream recipe",
        "Pretrain a BiT architecture from scratch with the paper's upstream recipe (BiT-S, BiT-M or BiT-L "
        "schedule), on a tfds dataset or an image folder.",
    )
    embedded = ", ".join(f"{k} {v}" for k, v in defaults.DETECTION_EMBEDDED.items())
    _add_training(
        sub,
        "finetune_detector",
        "fine-tune a RetinaNet on a BiT backbone (the paper's detection transfer)",
        "Fine-tune a RetinaNet (feature pyramid, focal loss) on a BiT backbone with the paper's COCO recipe: 30 "
        "epochs, lr 0.08 at batch 256 (scaled to --batch) divided by 10 at epochs 16 and 22, momentum 0.9, weight "
        "decay 1e-4, flips and scale jitter; scored with COCO AP (pycocotools). Without --dataset or --coco_folder: "
        f"the offline digit canvases with {embedded} (each overridable).",
    )

    embedded = ", ".join(f"{k} {v}" for k, v in defaults.DISTILL_EMBEDDED.items())
    _add_training(
        sub,
        "distill",
        "distill a BiT teacher into a smaller student by function matching",
        "Distill a teacher (a fine-tuned model) into a student by function matching (Beyer et al., 2022): both see "
        "the same inception-cropped, flipped and MixUp-ed batch and the student matches the teacher's softmax (KL "
        "divergence; the labels only measure accuracy). Without --dataset or --image_folder: the embedded digits, "
        f"offline, the main job's run (LOGDIR/{defaults.DISTILL_TEACHER_RUN}, fine-tuned first when missing) as the "
        f"teacher, with {embedded} (each overridable).",
    )


def _fewshot(args):
    from bit_keras.training.fewshot import fewshot, table

    data = args.dataset or (os.path.basename(os.path.normpath(args.image_folder)) if args.image_folder else "digits")
    name = os.path.basename(os.path.normpath(str(args.model))).removesuffix(".npz").removesuffix(".keras")
    out = args.out if args.out is not None else os.path.join("fewshot", f"{data.replace('/', '-')}-{name}.json")
    kwargs = {k: getattr(args, k) for k in ("dataset", "image_folder", "data_dir", "test_fraction", "max_pixels")}
    kwargs |= {k: getattr(args, k) for k in ("seeds", "l2", "resolution", "batch", "cache_dir", "overwrite")}
    report = fewshot(args.model, shots=tuple(args.shots), out=out, **kwargs)
    print(table(report))
    print(f"wrote {out}")


def _detect(args):
    from bit_keras.detection.detect import detect, print_table

    given = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
    results = detect(
        args.model, args.images, out=args.out, max_pixels=args.max_pixels, overwrite=args.overwrite, **given
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def _export(args):
    from bit_keras.models.resolve import kind_of, resolve_model
    from bit_keras.serving import formats
    from bit_keras.serving.export import export, export_inputs

    if (args.run is None) == (args.model is None):
        raise ValueError("give exactly one of --model (a name, .npz or .keras file) and --run (a run folder)")
    if args.run is not None and _is_detection_run(args.run):
        if args.format != "saved_model":
            raise ValueError(f"{args.run} is a detection run: it exports as a SavedModel only (drop --format)")
        _export_detector(args)
        return
    random = args.model is not None and kind_of(args.model) == "architecture" and args.weights is None
    if random and args.kind == "classification":
        raise ValueError(
            f"{args.model} is an architecture (random weights, no head): --kind classification needs a checkpoint "
            "name, a .keras file or a run folder; leave --kind out for a feature-vector export"
        )
    source = resolve_model(
        args.run or args.model,
        weights=args.weights,
        num_classes=0 if random else None,  # an architecture's random features: no head to ask a size for
        labels=args.labels,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        offline=OFFLINE_WEIGHTS,
    )
    kind = args.kind or ("classification" if source.model.num_classes else "feature_vector")
    class_names, image_size, notes = export_inputs(source, kind, args.format)  # labels only for a classifier
    for note in notes:
        print(f"bit-keras export: note: {note}", file=sys.stderr)
    out = args.out or os.path.join("exports", source.name, kind) + formats.SUFFIXES.get(args.format, "")
    out = export(source.model, out, kind, class_names, image_size, args.top_k, args.overwrite, format=args.format)
    what = kind if args.format == "saved_model" else f"{kind} {args.format}"
    print(f"wrote {out}: {what} export of {source.name}" + (" (random weights)" if random else ""))


def _is_detection_run(folder):
    """Whether `folder` is a finished `finetune-detector` run: its preset's task is a detector (the model says what it
    is; nothing beside it is read)."""
    from bit_keras.files import read_regular
    from bit_keras.training.run_folder import MAX_RUN_FILE_BYTES

    path = os.path.join(folder, "task.json")
    if not os.path.lexists(path):
        return False
    task = json.loads(read_regular(path, "run files", MAX_RUN_FILE_BYTES).decode("utf-8"))
    return isinstance(task, dict) and task.get("registered_name") == "bit_keras>RetinaNet"


def _export_detector(args):
    from bit_keras.detection.export import export_detector
    from bit_keras.detection.retinanet import load_detector

    given = [flag for flag in ("weights", "labels", "image_size", "kind") if getattr(args, flag) is not None]
    if given:
        raise ValueError(
            f"{args.run} is a detection run: it carries its own weights, labels and size (drop --{given[0]})"
        )
    name = os.path.basename(os.path.abspath(args.run))
    out = args.out or os.path.join("exports", name, "detection")
    out = export_detector(load_detector(args.run, "run"), out, overwrite=args.overwrite)
    print(f"wrote {out}: detection export of {name}")


def _predict(args):
    from bit_keras.serving.predict import predict

    results = predict(
        args.model, args.images, args.top_k, args.labels, args.image_size, args.cache_dir, max_pixels=args.max_pixels
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    width = max(len(p["label"]) for r in results for p in r["predictions"])
    for result in results:
        print(result["image"])
        for rank, p in enumerate(result["predictions"], start=1):
            print(f"  {rank}. {p['label']:<{width}}  {p['probability']:.4f}  (class {p['class']})")


class _Version(argparse.Action):
    """`--version`: the installed package's version."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {importlib.metadata.version('bit-keras')}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bit-keras", description="Big Transfer (BiT) for Keras 3.")
    parser.add_argument("--version", action=_Version)
    verbose = f"show TensorFlow's start-up and native log lines (also {startup.VERBOSE}=1)"
    parser.add_argument("--verbose", action="store_true", help=verbose)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="print the model zoo table")
    models.add_argument("--architectures", action="store_true", help="also list bare architectures")
    models.set_defaults(func=_models)

    convert = sub.add_parser("convert", help="turn an official checkpoint into a .keras model file")
    convert.add_argument("model", help="checkpoint name (BiT-M-R50x1), architecture (R50x1) or .npz path/URL")
    convert.add_argument("--out", required=True, help="output .keras file")
    convert.add_argument(
        "--weights", default=None, help="'pretrained', an .npz path or URL (default: pretrained for checkpoint names)"
    )
    convert.add_argument("--num_classes", type=int, default=None, help="new zero-initialized head size; 0: features")
    convert.add_argument("--dtype", default=None, help="dtype policy, e.g. mixed_bfloat16")
    convert.add_argument("--cache_dir", default=None, help="download cache directory")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    convert.set_defaults(func=_convert)

    _add_recipes(sub)

    export = sub.add_parser("export", help="write a TF-Hub-style SavedModel (feature vector or classifier)")
    export.add_argument("--model", default=None, help="checkpoint name, architecture, .npz, or .keras file")
    export.add_argument("--run", default=None, help="a finetune or finetune-detector run folder (instead of --model)")
    export.add_argument("--weights", default=None, help="an .npz path or URL for --model (default: pretrained)")
    export.add_argument(
        "--kind",
        choices=("feature_vector", "classification"),
        default=None,
        help="default: classification when the model has a head",
    )
    export.add_argument(
        "--format",
        choices=defaults.EXPORT_FORMATS,
        default="saved_model",
        help="saved_model (TF-Hub style, default), or one .onnx / .tflite file, checked against the Keras model "
        "(needs bit-keras[onnx] for onnx)",
    )
    export.add_argument(
        "--out", default=None, help="output directory or file (default: exports/NAME/KIND[.onnx|.tflite])"
    )
    export.add_argument("--labels", default=None, help="class names file, one per line (classification)")
    export.add_argument("--image_size", type=int, default=None, help="side the bytes signature resizes images to")
    export.add_argument("--top_k", type=int, default=5, help="classes the bytes signature returns (default 5)")
    export.add_argument("--cache_dir", default=None, help="download cache directory")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    export.set_defaults(func=_export)

    predict = sub.add_parser("predict", help="top-k classes of image files")
    predict.add_argument(
        "--model",
        required=True,
        help="classification export (directory, .onnx or .tflite file), .keras file, run folder or checkpoint",
    )
    predict.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
    predict.add_argument("--top_k", type=int, default=5, help="classes per image (default 5)")
    predict.add_argument("--labels", default=None, help="class names file for a .keras model without class_names.txt")
    predict.add_argument("--image_size", type=int, default=None, help="resize side for a .keras model")
    predict.add_argument("--cache_dir", default=None, help="download cache directory")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_max_pixels(predict)
    predict.set_defaults(func=_predict)

    fewshot = sub.add_parser(
        "fewshot",
        help="few-shot linear accuracy of a model's features (big_vision's closed-form evaluator)",
        description="The frozen pre-logits of k training images per class, a closed-form L2-regularized "
        "least-squares classifier onto targets in {-1, 1}, its test accuracy: mean and std over seeds per k. Without "
        "--dataset or --image_folder: the embedded digits, offline.",
    )
    shipped, few = defaults.FINETUNE_EMBEDDED["model"], defaults.FEWSHOT
    fewshot.add_argument("--model", default=shipped, help=f"anything finetune's --model takes (default {shipped})")
    fewshot.add_argument("--dataset", default=None, help="tensorflow-datasets name or a bundled one (digits, mnist5k)")
    fewshot.add_argument("--image_folder", default=None, help="folder with one subfolder of images per class")
    fewshot.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory")
    fewshot.add_argument(
        "--test_fraction", type=float, default=None, help="of an image folder without train/ and test/ (default 0.2)"
    )
    fewshot.add_argument(
        "--shots", type=int, nargs="+", default=[1, 5, 10, 25], help="examples per class (default 1 5 10 25)"
    )
    fewshot.add_argument("--seeds", type=int, default=3, help="draws of the examples per k (default 3)")
    fewshot.add_argument("--l2", type=float, default=2.0**10, help="L2 regularization (default 1024, big_vision's)")
    fewshot.add_argument("--resolution", type=int, default=None, help="image side (default: the model's input size)")
    fewshot.add_argument("--batch", type=int, default=few["batch"], help=f"images per pass (default {few['batch']})")
    fewshot.add_argument("--cache_dir", default=None, help="download cache directory")
    fewshot.add_argument("--out", default=None, help="the JSON report (default: fewshot/DATA-MODEL.json)")
    fewshot.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_max_pixels(fewshot)
    fewshot.set_defaults(func=_fewshot)

    detect = sub.add_parser("detect", help="detected objects in image files, printed and drawn as PNGs")
    detect.add_argument("--model", required=True, help="a finetune-detector run folder, its model.keras or its export")
    detect.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
    detect.add_argument("--out", default="detections", help="folder for the drawn PNGs (default: detections)")
    detect.add_argument("--score_threshold", type=float, default=None, help="lowest score shown (default 0.5)")
    detect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    detect.add_argument("--overwrite", action="store_true", help="replace existing pictures in --out (never an input)")
    _add_max_pixels(detect)
    detect.set_defaults(func=_detect)
    for command in sub.choices.values():  # --verbose after the subcommand too
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[startup.VERBOSE] = "1"
    try:
        with checks.command_line():  # messages name flags (--labels), not Python arguments (labels=)
            if args.func is not _models:
                import bit_keras

                bit_keras.load()  # every module: the subcommands load `.keras` files, whose classes must be registered
            args.func(args)
    except KeyboardInterrupt as stop:  # a run's (engine.RunStopped) says where the same command resumes it
        print(f"bit-keras {args.command}: {stop.args[0] if stop.args else 'stopped (Ctrl-C)'}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `bit-keras models | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if startup.verbose() and not _named(err):
            raise  # --verbose: the traceback of what bit_keras did not foresee
        print(f"bit-keras {args.command}: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


# What bit_keras raises with a message naming the problem (CheckpointError and DownloadError among them).
NAMED_ERRORS = (ValueError, OSError, ImportError, FloatingPointError, RuntimeError)


def _named(err: Exception) -> bool:
    """Whether `err` names its problem: one of `NAMED_ERRORS`, or a TensorFlow op error (an image that does not
    decode, met during training)."""
    tf = sys.modules.get("tensorflow")
    return isinstance(err, NAMED_ERRORS) or (tf is not None and isinstance(err, tf.errors.OpError))


def _one_line(err: Exception) -> str:
    """The first line of `err`'s message (TensorFlow's own for op errors); for an error bit_keras did not foresee,
    its type too and how to see the traceback."""
    tf = sys.modules.get("tensorflow")
    op_error = tf is not None and isinstance(err, tf.errors.OpError)
    message = err.message if op_error else str(err)
    line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if op_error:
        return f"{type(err).__name__}: {line}"
    if _named(err):
        return line or type(err).__name__
    return f"unexpected {type(err).__name__}: {line} (rerun with --verbose for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
