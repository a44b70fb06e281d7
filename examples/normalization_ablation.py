"""The BiT paper's normalization ablation at toy scale: GroupNorm + Weight Standardization vs BatchNorm when
each replica sees a tiny batch.

    python examples/normalization_ablation.py            # ~5-10 min on 2 CPU cores
    python examples/normalization_ablation.py --per_replica_batch 8 --epochs 6

Pretrains the same small architecture (R26x0.5) from scratch with `bit_keras.pretrain` (the upstream
recipe, scaled down) on scikit-learn's bundled digits, under MirroredStrategy over 2 logical CPU devices
with `--per_replica_batch` examples per replica (2 by default; BatchNorm normalizes over those only), once
with GN+WS (BiT) and once with BN and plain convolutions, in the run folders `runs/ablation/group` and
`runs/ablation/batch` (`--logdir`). Prints both test accuracies and saves their curves to `--out` (a PNG).
"""

import argparse
import os

import tensorflow as tf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per_replica_batch", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--base_lr", type=float, default=0.1, help="per 256 examples, as the upstream recipe")
    parser.add_argument("--logdir", default="runs/ablation")
    parser.add_argument("--out", default="normalization_ablation.png")
    args = parser.parse_args()

    cpu = tf.config.list_physical_devices("CPU")[0]  # before any op: split the CPU into logical devices
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    from bit_keras.data import sources
    from bit_keras.training.pretrain import pretrain
    from bit_keras.training.strategy import make_strategy

    strategy = make_strategy("mirrored")
    digits = sources.embedded_digits()
    batch = args.per_replica_batch * strategy.num_replicas_in_sync
    results = {}
    for label, normalization, ws in (("GroupNorm + WS (BiT)", "group", True), ("BatchNorm", "batch", False)):
        result = pretrain(
            data=digits,
            model="R26x0.5",
            name=normalization,
            logdir=args.logdir,
            strategy=strategy,
            normalization=normalization,
            weight_standardization=ws,
            batch=batch,
            base_lr=args.base_lr,
            epochs=args.epochs,
            decay_epochs=(args.epochs * 3 // 4,) if args.epochs > 1 else (),
            warmup_steps=100,
            resolution=32,
            overwrite=True,
            verbose=0,
        )
        results[label] = result.metrics
        print(f"{label:22s} test accuracy {result.metrics['test_accuracy']:.4f}  ({result.metrics['steps']} steps)")
    plot(results, f"{args.replicas} replicas x {args.per_replica_batch} images", args.out)
    print(f"saved {os.path.abspath(args.out)}")


def plot(results, setting, path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, metrics in results.items():
        evals = metrics["evals"]
        ax.plot([e["step"] for e in evals], [e["test_accuracy"] for e in evals], marker="o", label=label)
    ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title=f"digits, R26x0.5 from scratch, {setting}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
