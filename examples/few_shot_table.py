"""A few-shot transfer table like the BiT paper's: pretrained-then-fine-tuned vs the same architecture from scratch.

    python examples/few_shot_table.py --pretrained runs/NAME/checkpoint.npz       # from `bit-keras pretrain`
    python examples/few_shot_table.py --pretrained CKPT.npz --shots 1 5 10 --seeds 0 1 2 --out few_shot.md

For each number of examples per class and each seed, fine-tunes on that few-shot draw of the embedded digits
(`bit_keras.finetune` with the embedded settings: 32px crops, batch 64, 500 steps) once from the pretrained
checkpoint (a new zero head, the HyperRule's base lr 0.003) and once from scratch (the checkpoint's
architecture with random weights, base lr 0.1), with the same budget. Prints mean +- std of the test accuracy over the seeds as a Markdown
table, and writes it to `--out`.
"""

import argparse
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", required=True, help="an official-layout .npz checkpoint")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the embedded 500)")
    parser.add_argument("--logdir", default="runs/few_shot")
    parser.add_argument("--out", default="few_shot.md")
    args = parser.parse_args()

    from bit_keras import checkpoint
    from bit_keras.finetune import finetune
    from bit_keras.zoo import BLOCK_UNITS

    units, width = checkpoint.architecture_of(checkpoint.read_npz(args.pretrained), args.pretrained)
    depth = next(d for d, u in BLOCK_UNITS.items() if u == units)
    architecture = f"R{depth}x{width:g}"
    rows = []
    for shots in args.shots:
        accuracies = {"pretrained": [], "scratch": []}
        for seed in args.seeds:
            # The HyperRule's base lr for transfer; the embedded default's larger one for training from scratch.
            for kind, model, base_lr in (("pretrained", args.pretrained, 0.003), ("scratch", architecture, 0.1)):
                result = finetune(
                    model=model,
                    base_lr=base_lr,
                    name=f"{kind}-{shots}shot-seed{seed}",
                    logdir=args.logdir,
                    examples_per_class=shots,
                    examples_per_class_seed=seed,
                    seed=seed,
                    steps=args.steps,
                    overwrite=True,
                    verbose=0,
                )
                accuracies[kind].append(result.metrics["test_accuracy"])
                print(f"{shots:>2}-shot seed {seed} {kind:10s} {result.metrics['test_accuracy']:.4f}", flush=True)
        rows.append((shots, *(_mean_std(accuracies[k]) for k in ("pretrained", "scratch"))))
    table = [
        f"| examples per class | {os.path.basename(args.pretrained)} fine-tuned | {architecture} from scratch |",
        "|---|---|---|",
        *(f"| {shots} | {pre} | {scratch} |" for shots, pre, scratch in rows),
    ]
    text = "\n".join(table) + f"\n\nTest accuracy on the embedded digits, mean ± std over seeds {args.seeds}.\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


def _mean_std(values):
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}%"


if __name__ == "__main__":
    main()
