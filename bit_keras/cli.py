"""`bit-keras`: one subcommand per function (`models`, `convert`, `finetune`, `pretrain`, `finetune-detector`,
`export`, `predict`, `detect`).

The parser is built from `bit_keras.defaults` alone, so that --help, --version and argument errors come without
importing TensorFlow; `models` imports Keras and the zoo, the other subcommands every module (`bit_keras.load`)."""

import argparse
import importlib.metadata
import json
import os
import sys

from bit_keras import checks, defaults, startup

# Parsed arguments that are not keyword arguments of the recipe.
TRAINING_FLAGS = ("command", "func", "recipe", "quiet", "verbose")
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
    import bit_keras
    from bit_keras.training import engine

    options = {k: v for k, v in vars(args).items() if k not in TRAINING_FLAGS}
    try:
        result = getattr(bit_keras, args.recipe)(**options, verbose=0 if args.quiet else 1)
    except engine.FinishedRun as finished:
        print(f"{engine.result_line(finished.metrics, finished.run_dir)} (finished before; --overwrite trains again)")
        return
    if args.quiet:
        print(engine.result_line(result.metrics, result.run_dir))


def _add_run_flags(p, *, dataset, batch, base_lr, eval_every, resolution, classification=True):
    """The flags of every training subcommand (`bit_keras.training.engine.RunOptions`); the arguments are the
    `(default, help)` of those whose default depends on the recipe (`dataset`: its help only). Detection
    (`classification=False`) reads no image folders and no manual tfds downloads."""
    p.add_argument(
        "--name", default=None, help="run name: the run folder is LOGDIR/NAME (default: from data and model)"
    )
    p.add_argument("--logdir", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--dataset", default=None, help=dataset)
    if classification:
        p.add_argument("--image_folder", default=None, help="folder with one subfolder of images per class")
        p.add_argument(
            "--test_fraction",
            type=float,
            default=0.2,
            help="of an image folder without train/ and test/ subfolders: the share of each class held out for "
            "testing (default 0.2)",
        )
    p.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory")
    if classification:
        p.add_argument("--manual_dir", default=None, help="tensorflow-datasets manual download directory")
    p.add_argument("--train_split", default="train", help="tfds training split (default: train)")
    p.add_argument("--test_split", default="test", help="tfds test (held-out) split (default: test)")
    p.add_argument("--batch", type=int, default=batch[0], help=f"global batch ({batch[1]})")
    p.add_argument("--batch_split", type=int, default=1, help="micro-batches per replica batch (same update)")
    p.add_argument("--base_lr", type=float, default=base_lr[0], help=base_lr[1])
    p.add_argument("--eval_every", type=int, default=eval_every[0], help=eval_every[1])
    p.add_argument("--resolution", type=int, default=resolution[0], help=resolution[1])
    p.add_argument(
        "--strategy", choices=defaults.STRATEGIES, default="auto", help="tf.distribute strategy (default: auto)"
    )
    p.add_argument("--tpu", default=None, help="TPU name or grpc:// address ('local' on a TPU VM)")
    p.add_argument("--mixed_precision", choices=("none", "bfloat16", "float16"), default=None, help="compute dtype")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA (not with Mirrored on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, data order, augmentation and MixUp")
    p.add_argument("--overwrite", action="store_true", help="start afresh, deleting the run folder's run files")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors (the run's train.log has everything)")
    _add_max_pixels(p)


def _add_max_pixels(p):
    p.add_argument(
        "--max_pixels",
        type=int,
        default=defaults.MAX_PIXELS,
        help=f"refuse image files larger than this (default {defaults.MAX_PIXELS:,})",
    )


def _add_finetune(sub):
    embedded = ", ".join(f"{k} {v}" for k, v in defaults.FINETUNE_EMBEDDED.items())
    p = sub.add_parser(
        "finetune",
        help="fine-tune a BiT model with the BiT-HyperRule",
        description="Fine-tune a BiT model on a tfds dataset or an image folder with the BiT-HyperRule. "
        f"Without --dataset or --image_folder: scikit-learn's bundled digits, offline, with {embedded} "
        "(each overridable).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint name (default BiT-M-R50x1), official .npz path/URL, architecture (from scratch), "
        ".keras file or run folder",
    )
    _add_run_flags(
        p,
        dataset="tensorflow-datasets name (e.g. cifar10) or a bundled one (digits, mnist5k)",
        batch=(None, "HyperRule: 512"),
        base_lr=(None, "learning rate at batch 512 (HyperRule: 0.003)"),
        eval_every=(None, "evaluate and checkpoint every N steps (default: a tenth of the run)"),
        resolution=(None, "crop size, replacing the HyperRule's"),
    )
    p.add_argument("--examples_per_class", type=int, default=None, help="few-shot: K training examples per class")
    p.add_argument("--examples_per_class_seed", type=int, default=0, help="seed of the few-shot draw")
    p.add_argument("--bit_pretrained_dir", default=None, help="folder of official NAME.npz checkpoints (else download)")
    p.add_argument("--dataset_size", type=int, default=None, help="training-set size for the HyperRule")
    p.add_argument("--steps", type=int, default=None, help="total steps (the schedule scaled to fit)")
    p.add_argument("--mixup_alpha", type=float, default=None, help="MixUp alpha, replacing the HyperRule's")
    p.add_argument("--freeze_backbone", action="store_true", help="train only the head (a linear probe)")
    p.add_argument(
        "--trainable_from", choices=defaults.TRAINABLE_FROM, default=None, help="freeze everything before this"
    )
    p.add_argument("--cache_dir", default=None, help="download cache directory")
    p.set_defaults(func=_train, recipe="finetune")


def _add_pretrain(sub):
    p = sub.add_parser("pretrain", help="pretrain a BiT architecture from scratch with the paper's upstream recipe")
    p.add_argument("--model", default="R50x1", help="architecture, e.g. R50x1 or R26x0.5 (default R50x1)")
    _add_run_flags(
        p,
        dataset="tensorflow-datasets name (e.g. imagenet2012) or a bundled one (digits, mnist5k)",
        batch=(defaults.UPSTREAM_BATCH, f"default {defaults.UPSTREAM_BATCH}"),
        base_lr=(defaults.UPSTREAM_BASE_LR, f"lr per 256 examples (default {defaults.UPSTREAM_BASE_LR})"),
        eval_every=(None, "evaluate and checkpoint every N steps (default: an epoch)"),
        resolution=(224, "training crop and evaluation size (default 224)"),
    )
    schedules = sorted(defaults.UPSTREAM_PRESETS)
    p.add_argument(
        "--schedule", choices=schedules, default="bit-m", help="the paper's epochs and decays (default bit-m)"
    )
    p.add_argument("--preset", choices=schedules, default=None, help="the earlier name of --schedule")
    p.add_argument("--epochs", type=int, default=None, help="replace the preset's epochs")
    p.add_argument("--decay_epochs", type=int, nargs="+", default=None, help="replace the preset's decay epochs")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: 5000 steps of batch 4096, rescaled")
    p.add_argument(
        "--weight_decay", type=float, default=defaults.UPSTREAM_WEIGHT_DECAY, help="L2 on kernels (default 1e-4)"
    )
    p.add_argument("--normalization", choices=defaults.NORMALIZATIONS, default="group", help="group (BiT) or batch")
    p.add_argument(
        "--no_weight_standardization",
        dest="weight_standardization",
        action="store_false",
        help="plain convolutions (the paper's ablation)",
    )
    p.set_defaults(func=_train, recipe="pretrain")


def _add_finetune_detector(sub):
    paper = defaults.DETECTION_DEFAULTS
    embedded = ", ".join(f"{k} {v}" for k, v in defaults.DETECTION_EMBEDDED.items())
    p = sub.add_parser(
        "finetune-detector",
        help="fine-tune a RetinaNet on a BiT backbone (the paper's detection transfer)",
        description="Fine-tune a RetinaNet (feature pyramid, focal loss) on a BiT backbone with the paper's COCO "
        "recipe: 30 epochs, lr 0.08 at batch 256 (scaled to --batch) divided by 10 at epochs 16 and 22, momentum "
        "0.9, weight decay 1e-4, flips and scale jitter; scored with COCO AP (pycocotools). Without --dataset or "
        f"--coco_folder: the offline digit canvases with {embedded} (each overridable).",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"the backbone: checkpoint name (default {paper['model']}), "
        "official .npz path/URL, architecture (from scratch) or .keras BiT",
    )
    _add_run_flags(
        p,
        dataset="coco/2017, voc/2007 or voc/2012 (tensorflow-datasets) or digit-canvases",
        batch=(None, f"paper: {paper['batch']}"),
        base_lr=(None, f"learning rate at batch 256 (paper: {paper['base_lr']})"),
        eval_every=(None, "evaluate (test loss, COCO AP) and checkpoint every N steps (default: a tenth of the run)"),
        resolution=(None, f"square input side, a multiple of 128 (paper: {paper['resolution']})"),
        classification=False,
    )
    p.add_argument("--coco_folder", default=None, help="a COCO-format folder: images and annotations/instances*.json")
    p.add_argument("--epochs", type=float, default=None, help=f"epochs (paper: {paper['epochs']})")
    p.add_argument("--steps", type=int, default=None, help="total steps, replacing what the epochs give")
    p.add_argument("--fpn_channels", type=int, default=None, help=f"pyramid width (paper: {paper['fpn_channels']})")
    p.add_argument("--head_channels", type=int, default=None, help=f"subnet width (paper: {paper['head_channels']})")
    p.add_argument("--head_depth", type=int, default=None, help=f"subnet convolutions (paper: {paper['head_depth']})")
    p.add_argument(
        "--head_norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="group normalization in the subnets, for small batches (paper: no)",
    )
    p.add_argument("--freeze_backbone", action="store_true", help="train only the pyramid and the subnets")
    p.add_argument("--bit_pretrained_dir", default=None, help="folder of official NAME.npz checkpoints (else download)")
    p.add_argument("--cache_dir", default=None, help="download cache directory")
    p.set_defaults(func=_train, recipe="finetune_detector")


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
    """Whether `folder` is a `finetune-detector` run (its run.json describes a detector)."""
    path = os.path.join(folder, "run.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return "detector" in json.load(f)


def _export_detector(args):
    from bit_keras.detection.export import export_detector
    from bit_keras.detection.retinanet import RetinaNet
    from bit_keras.models.resolve import CLASS_NAMES_FILE, MODEL_FILE, load_keras, read_labels

    given = [flag for flag in ("weights", "labels", "image_size", "kind") if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"{args.run} is a detection run: it has its own weights, labels and size (drop --{given[0]})")
    model_path = os.path.join(args.run, MODEL_FILE)
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"{model_path} does not exist (is the run in {args.run} finished?)")
    name = os.path.basename(os.path.abspath(args.run))
    out = args.out or os.path.join("exports", name, "detection")
    model = load_keras(model_path, RetinaNet)
    out = export_detector(model, out, read_labels(os.path.join(args.run, CLASS_NAMES_FILE)), overwrite=args.overwrite)
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

    _add_finetune(sub)
    _add_pretrain(sub)
    _add_finetune_detector(sub)

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
