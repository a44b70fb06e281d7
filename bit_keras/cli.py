"""`bit-keras`: one subcommand per function (`models`, `convert`)."""

import argparse
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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "convert" and args.weights is None:
        from bit_keras.zoo import CHECKPOINTS

        args.weights = "pretrained" if args.model in CHECKPOINTS else None
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # CheckpointError, DownloadError, FileNotFoundError included
        print(f"bit-keras {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
