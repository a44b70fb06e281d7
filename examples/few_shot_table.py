"""A few-shot transfer table like the BiT paper's: pretrained-then-fine-tuned vs the same architecture from scratch.

    python examples/few_shot_table.py                  # the shipped BiT-R14x0.5-mnist5k
    python examples/few_shot_table.py --pretrained runs/BiT-R14x0.5-mnist5k/checkpoint.npz   # yours: the run
        # folder examples/pretrain_shipped_model.sh writes (every `bit-keras pretrain` run has a checkpoint.npz)

For each number of examples per class and each seed, fine-tunes on that few-shot draw of the embedded digits
(`bit_keras.finetune` with the embedded settings: 32px crops, batch 64, 500 steps) once from the pretrained
checkpoint (a new zero head) at each `--pretrained_lrs` base lr (default: the HyperRule's 0.003 and the embedded
default's 0.03) and once from scratch (the checkpoint's architecture with random weights, base lr 0.1, tuned for
training from scratch), with the same budget. Each run's folder is `--logdir`/`Kshot-seedS-runI` (default
`runs/few_shot/1shot-seed0-run0`, ...: K examples per class, seed S, the I-th column of the table).
Prints mean +- std of the test accuracy over the seeds as a Markdown table, and writes it to `--out`.
"""

import argparse
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pretrained", default="BiT-R14x0.5-mnist5k", help="a zoo name or an official-layout .npz file"
    )
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrained_lrs", type=float, nargs="+", default=None, help="base lrs of the pretrained runs")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the embedded 500)")
    parser.add_argument("--logdir", default="runs/few_shot")
    parser.add_argument("--out", default="few_shot.md")
    args = parser.parse_args()

    from bit_keras.models.zoo import architecture_name
    from bit_keras.training.finetune import EMBEDDED, finetune
    from bit_keras.training.hyperrule import BASE_LR

    architecture = architecture_name(args.pretrained)
    pretrained_lrs = args.pretrained_lrs or [BASE_LR, EMBEDDED["base_lr"]]
    name = os.path.basename(args.pretrained).removesuffix(".npz")
    runs = [(f"{name} fine-tuned, base lr {lr:g}", args.pretrained, lr) for lr in pretrained_lrs]
    runs.append((f"{architecture} from scratch, base lr {SCRATCH_LR:g}", architecture, SCRATCH_LR))
    rows = []
    for shots in args.shots:
        accuracies = [[] for _ in runs]
        for seed in args.seeds:
            for i, (column, model, base_lr) in enumerate(runs):
                result = finetune(
                    model=model,
                    base_lr=base_lr,
                    name=f"{shots}shot-seed{seed}-run{i}",
                    logdir=args.logdir,
                    examples_per_class=shots,
                    examples_per_class_seed=seed,
                    seed=seed,
                    steps=args.steps,
                    overwrite=True,
                    verbose=0,
                )
                accuracies[i].append(result.metrics["test_accuracy"])
                print(f"{shots:>2}-shot seed {seed} {column}: {result.metrics['test_accuracy']:.4f}", flush=True)
        rows.append(f"| {shots} | " + " | ".join(_mean_std(a) for a in accuracies) + " |")
    table = [
        "| examples per class | " + " | ".join(column for column, _, _ in runs) + " |",
        "|---" * (len(runs) + 1) + "|",
        *rows,
    ]
    text = "\n".join(table) + f"\n\nTest accuracy on the embedded digits, mean ± std over seeds {args.seeds}.\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


SCRATCH_LR = 0.1  # base lr (at batch 512, scaled to 64) that trains R26x0.5 from scratch to 95.3% on the full digits


def _mean_std(values):
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}%"


if __name__ == "__main__":
    main()
