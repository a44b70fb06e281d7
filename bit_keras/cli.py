"""`bit-keras`: one subcommand per function (`models`, `convert`, `finetune`, `pretrain`, `export`, `predict`)."""

import argparse
import json
import os
import sys


def _models(args):
    from bit_keras import zoo

    rows = [("name", "architecture", "upstream data", "classes", "input", "params (M)", "labels")]
    for entry in zoo.CHECKPOINTS.values():
        params = zoo.parameter_count(entry.arch, entry.num_classes) / 1e6
        rows.append(
            (entry.name, entry.arch, entry.upstream, str(entry.num_classes), str(entry.input_size), f"{params:.1f}", entry.labels)
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
    import bit_keras

    if not args.out.endswith(".keras"):
        raise SystemExit(f"bit-keras convert: --out must end with .keras, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"bit-keras convert: {args.out} exists (pass --overwrite to replace it)")
    model = bit_keras.create_model(
        args.model, weights=args.weights, num_classes=args.num_classes, cache_dir=args.cache_dir, dtype=args.dtype
    )
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(args.out)}.{os.getpid()}.keras")  # Keras wants .keras
    try:
        model.save(tmp)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out}: {model.name}, {model.count_params():,} parameters, {model.num_classes or 'no'} head classes")


def _finetune(args):
    from bit_keras.finetune import finetune

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "quiet")}
    finetune(**options, verbose=0 if args.quiet else 1)


def _add_finetune(sub):
    from bit_keras.finetune import EMBEDDED, TRAINABLE_FROM
    from bit_keras.strategy import STRATEGIES

    embedded = ", ".join(f"{k} {v}" for k, v in EMBEDDED.items())
    p = sub.add_parser(
        "finetune",
        help="fine-tune a BiT model with the BiT-HyperRule",
        description="Fine-tune a BiT model on a tfds dataset or an image folder with the BiT-HyperRule. "
        f"Without --dataset or --image_folder: scikit-learn's bundled digits, offline, with {embedded} "
        "(each overridable).",
    )
    # The official big_transfer flags.
    p.add_argument("--name", default=None, help="run name: the run folder is LOGDIR/NAME (default: DATA-MODEL)")
    p.add_argument(
        "--model", default=None, help="checkpoint name (default BiT-M-R50x1), official .npz path/URL, or architecture (from scratch)"
    )
    p.add_argument("--logdir", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--dataset", default=None, help="tensorflow-datasets name (e.g. cifar10) or a bundled one (digits, mnist5k)")
    p.add_argument("--examples_per_class", type=int, default=None, help="few-shot: K training examples per class")
    p.add_argument("--examples_per_class_seed", type=int, default=0, help="seed of the few-shot draw")
    p.add_argument("--batch", type=int, default=None, help="global batch (HyperRule: 512)")
    p.add_argument("--batch_split", type=int, default=1, help="micro-batches per replica batch (same update)")
    p.add_argument("--base_lr", type=float, default=None, help="learning rate at batch 512 (HyperRule: 0.003)")
    p.add_argument("--eval_every", type=int, default=None, help="evaluate and checkpoint every N steps")
    p.add_argument("--bit_pretrained_dir", default=None, help="folder of official NAME.npz checkpoints (else download)")
    # Ours.
    p.add_argument("--image_folder", default=None, help="folder with one subfolder of images per class")
    p.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory")
    p.add_argument("--manual_dir", default=None, help="tensorflow-datasets manual download directory")
    p.add_argument("--train_split", default="train", help="tfds training split (default: train)")
    p.add_argument("--test_split", default="test", help="tfds test split (default: test)")
    p.add_argument("--dataset_size", type=int, default=None, help="training-set size for the HyperRule")
    p.add_argument("--resolution", type=int, default=None, help="crop size, replacing the HyperRule's")
    p.add_argument("--steps", type=int, default=None, help="total steps (the schedule scaled to fit)")
    p.add_argument("--mixup_alpha", type=float, default=None, help="MixUp alpha, replacing the HyperRule's")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="tf.distribute strategy (default: auto)")
    p.add_argument("--tpu", default=None, help="TPU name or grpc:// address ('local' on a TPU VM)")
    p.add_argument("--mixed_precision", choices=("none", "bfloat16", "float16"), default=None, help="compute dtype")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA (not with Mirrored on CPU)")
    p.add_argument("--freeze_backbone", action="store_true", help="train only the head (a linear probe)")
    p.add_argument("--trainable_from", choices=TRAINABLE_FROM, default=None, help="freeze everything before this")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation and MixUp")
    p.add_argument("--cache_dir", default=None, help="download cache directory")
    p.add_argument("--overwrite", action="store_true", help="start afresh, deleting the run folder's run files")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_finetune)


def _pretrain(args):
    from bit_keras.pretrain import pretrain

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "quiet")}
    pretrain(**options, verbose=0 if args.quiet else 1)


def _add_pretrain(sub):
    from bit_keras import upstream
    from bit_keras.strategy import STRATEGIES

    p = sub.add_parser("pretrain", help="pretrain a BiT architecture from scratch with the paper's upstream recipe")
    p.add_argument("--dataset", default=None, help="tensorflow-datasets name (e.g. imagenet2012) or a bundled one (mnist5k)")
    p.add_argument("--image_folder", default=None, help="folder with one subfolder of images per class")
    p.add_argument("--model", default="R50x1", help="architecture, e.g. R50x1 or R26x0.5 (default R50x1)")
    p.add_argument("--name", default=None, help="run name: the run folder is LOGDIR/NAME")
    p.add_argument("--logdir", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory")
    p.add_argument("--manual_dir", default=None, help="tensorflow-datasets manual download directory")
    p.add_argument("--train_split", default="train", help="tfds training split")
    p.add_argument("--test_split", default="test", help="tfds held-out split")
    p.add_argument("--preset", choices=sorted(upstream.PRESETS), default="bit-m", help="epochs and decays")
    p.add_argument("--batch", type=int, default=upstream.BATCH, help="global batch (default 4096)")
    p.add_argument("--batch_split", type=int, default=1, help="micro-batches per replica batch")
    p.add_argument("--base_lr", type=float, default=upstream.BASE_LR, help="lr per 256 examples (default 0.03)")
    p.add_argument("--epochs", type=int, default=None, help="replace the preset's epochs")
    p.add_argument("--decay_epochs", type=int, nargs="+", default=None, help="replace the preset's decay epochs")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: 5000 steps of batch 4096, rescaled")
    p.add_argument("--weight_decay", type=float, default=upstream.WEIGHT_DECAY, help="L2 on kernels (default 1e-4)")
    p.add_argument("--resolution", type=int, default=224, help="training crop and evaluation size (default 224)")
    p.add_argument("--eval_every", type=int, default=None, help="evaluate and checkpoint every N steps (default: epoch)")
    p.add_argument("--normalization", choices=("group", "batch"), default="group", help="group (BiT) or batch")
    p.add_argument("--no_weight_standardization", dest="weight_standardization", action="store_false",
                   help="plain convolutions (the paper's ablation)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="tf.distribute strategy (default: auto)")
    p.add_argument("--tpu", default=None, help="TPU name or grpc:// address ('local' on a TPU VM)")
    p.add_argument("--mixed_precision", choices=("none", "bfloat16", "float16"), default=None, help="compute dtype")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, data order and augmentation")
    p.add_argument("--overwrite", action="store_true", help="start afresh, deleting the run folder's run files")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_pretrain)


def _export(args):
    from bit_keras import export as export_lib

    source = export_lib.load_source(args.model, args.weights, args.run, args.labels, args.image_size, args.cache_dir)
    kind = args.kind or ("classification" if source.model.num_classes else "feature_vector")
    out = args.out or os.path.join("exports", source.name, kind)
    if kind == "classification" and source.class_names is None:
        raise ValueError(f"no class names for {source.name}: pass --labels FILE (one name per line)")
    out = export_lib.export(
        source.model, out, kind, source.class_names, source.image_size, top_k=args.top_k, overwrite=args.overwrite
    )
    print(f"wrote {out}: {kind} export of {source.name}")


def _predict(args):
    from bit_keras.predict import predict

    results = predict(args.model, args.images, args.top_k, args.labels, args.image_size, args.cache_dir)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    width = max(len(p["label"]) for r in results for p in r["predictions"])
    for result in results:
        print(result["image"])
        for rank, p in enumerate(result["predictions"], start=1):
            print(f"  {rank}. {p['label']:<{width}}  {p['probability']:.4f}  (class {p['class']})")


def build_parser():
    parser = argparse.ArgumentParser(prog="bit-keras", description="Big Transfer (BiT) for Keras 3.")
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

    export = sub.add_parser("export", help="write a TF-Hub-style SavedModel (feature vector or classifier)")
    export.add_argument("--model", default=None, help="checkpoint name, architecture, .npz, or .keras file")
    export.add_argument("--run", default=None, help="a bit-keras finetune run folder (instead of --model)")
    export.add_argument("--weights", default=None, help="an .npz path or URL for --model (default: pretrained)")
    export.add_argument("--kind", choices=("feature_vector", "classification"), default=None,
                        help="default: classification when the model has a head")
    export.add_argument("--out", default=None, help="output directory (default: exports/NAME/KIND)")
    export.add_argument("--labels", default=None, help="class names file, one per line (classification)")
    export.add_argument("--image_size", type=int, default=None, help="side the bytes signature resizes images to")
    export.add_argument("--top_k", type=int, default=5, help="classes the bytes signature returns (default 5)")
    export.add_argument("--cache_dir", default=None, help="download cache directory")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    export.set_defaults(func=_export)

    predict = sub.add_parser("predict", help="top-k classes of image files")
    predict.add_argument("--model", required=True, help="classification export directory, .keras file or checkpoint")
    predict.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
    predict.add_argument("--top_k", type=int, default=5, help="classes per image (default 5)")
    predict.add_argument("--labels", default=None, help="class names file for a .keras model without class_names.txt")
    predict.add_argument("--image_size", type=int, default=None, help="resize side for a .keras model")
    predict.add_argument("--cache_dir", default=None, help="download cache directory")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.set_defaults(func=_predict)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "convert" and args.weights is None:
        from bit_keras.zoo import CHECKPOINTS

        args.weights = "pretrained" if args.model in CHECKPOINTS else None
    import tensorflow as tf

    try:
        args.func(args)
    except (ValueError, OSError, ImportError) as err:  # CheckpointError, DownloadError, FileNotFoundError, a missing extra
        print(f"bit-keras {args.command}: {err}", file=sys.stderr)
        return 1
    except tf.errors.OpError as err:  # e.g. an image whose body does not decode, met during training
        print(f"bit-keras {args.command}: {type(err).__name__}: {err.message.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
