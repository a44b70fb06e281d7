"""The BiT paper's detection transfer in small: a RetinaNet on a pretrained BiT backbone vs the same architecture
from scratch, on the embedded digit canvases, with the same budget.

    python examples/detection_transfer_table.py                  # the shipped backbone
    python examples/detection_transfer_table.py --pretrained runs/BiT-R14x0.5-mnist5k/checkpoint.npz   # yours: the run
        # folder examples/pretrain_shipped_model.sh writes (every `bit-keras pretrain` run has a checkpoint.npz)

Each run is `bit_keras.detection.finetune.finetune_detector` with the embedded settings (128px canvases, batch
16, 24 epochs, the 64-channel pyramid and heads with group norm, base lr 0.32 at batch 256), differing only in
the backbone's initialization (the checkpoint, or its architecture with random weights) and the seed, in the run
folders `--logdir`/`seedS-run0` (the checkpoint) and `seedS-run1` (from scratch), default
`runs/detection_transfer/seed0-run0`, .... Prints
mean +- std of COCO AP and AP50 over the seeds as a Markdown table, beside the paper's COCO numbers, and writes
it to `--out`.
"""

import argparse
import os

import numpy as np

# The BiT paper's detection transfer: COCO-2017 val AP, RetinaNet on R101x3 at 1024px (median of 5 runs).
PAPER = (("ILSVRC-2012 (supervised ResNet)", 40.8), ("BiT-S", 41.7), ("BiT-M", 43.2), ("BiT-L", 43.8))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", default="BiT-R14x0.5-mnist5k", help="a zoo name or an official .npz file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the embedded 24 epochs)")
    parser.add_argument("--logdir", default="runs/detection_transfer")
    parser.add_argument("--out", default="detection_transfer.md")
    args = parser.parse_args()

    from bit_keras.detection.finetune import finetune_detector
    from bit_keras.models.zoo import architecture_name

    architecture = architecture_name(args.pretrained)
    name = os.path.basename(args.pretrained).removesuffix(".npz")
    runs = ((f"{name} backbone, fine-tuned", args.pretrained), (f"{architecture} from scratch", architecture))
    scores = {column: [] for column, _ in runs}
    for seed in args.seeds:
        for i, (column, model) in enumerate(runs):
            result = finetune_detector(
                model=model, seed=seed, steps=args.steps, logdir=args.logdir, name=f"seed{seed}-run{i}", verbose=0
            )
            scores[column].append((result.metrics["test_ap"], result.metrics["test_ap50"]))
            print(f"seed {seed}, {column}: AP {scores[column][-1][0]:.3f}, AP50 {scores[column][-1][1]:.3f}")

    lines = [
        f"| RetinaNet on the digit canvases ({len(args.seeds)} seeds) | COCO AP | AP50 |",
        "|---|---|---|",
    ]
    for column, values in scores.items():
        ap, ap50 = np.asarray(values).T * 100
        lines.append(f"| {column} | {ap.mean():.1f} ± {ap.std():.1f} | {ap50.mean():.1f} ± {ap50.std():.1f} |")
    lines += ["", "| BiT paper: COCO-2017 val, R101x3 RetinaNet | COCO AP |", "|---|---|"]
    lines += [f"| {upstream} | {ap} |" for upstream, ap in PAPER]
    table = "\n".join(lines) + "\n"
    print(table)
    tmp = f"{args.out}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(table)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
