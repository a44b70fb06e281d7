"""Distillation against labels alone, at the same budget: the table of benchmarks/RESULTS.md.

    python examples/distillation_table.py             # 3 seeds x 4 students: 12 runs of 500 steps

On the embedded digits, with the same student (an R14x0.5 from random initialization), data, batch (64), resolution
(32) and steps (500), for each seed:
- labels only: `bit-keras finetune --model R14x0.5 --seed S` (the HyperRule's schedule, at the embedded default's
  base lr and at distillation's, so that the learning rate is not what differs);
- function matching: `bit-keras distill --seed S` (teacher: the main job's run, fine-tuned first when missing);
- fixed teacher: `bit-keras distill --teacher_input fixed --seed S` (the teacher sees the plain images).
Each run's folder is `--logdir`/`METHOD-seedS` (METHOD: labels, labels-lr, matching, fixed), the teacher's
`--logdir`/digits-BiT-R14x0.5-mnist5k. Prints the test accuracies per seed and their mean ± std as a Markdown table,
and writes it to `--out`.
"""

import argparse

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="every run's steps (default: the embedded 500)")
    parser.add_argument("--teacher", default=None, help="default: the main job's run in --logdir")
    parser.add_argument("--logdir", default="runs/distillation")
    parser.add_argument("--out", default="distillation.md")
    args = parser.parse_args()

    import bit_keras
    from bit_keras.defaults import DISTILL_EMBEDDED, FINETUNE_EMBEDDED

    labels_lr, distill_lr = FINETUNE_EMBEDDED["base_lr"], DISTILL_EMBEDDED["base_lr"]
    assert labels_lr != distill_lr, "the second labels-only row would repeat the first"
    student = DISTILL_EMBEDDED["student"]
    methods = [
        ("labels", "labels only", f"bit-keras finetune --model {student}", bit_keras.finetune, {"model": student}),
        (
            "labels-lr",
            f"labels only, base lr {distill_lr:g}",
            f"bit-keras finetune --model {student} --base_lr {distill_lr:g}",
            bit_keras.finetune,
            {"model": student, "base_lr": distill_lr},
        ),
        ("matching", "function matching", "bit-keras distill", bit_keras.distill, {"teacher": args.teacher}),
        (
            "fixed",
            "fixed teacher",
            "bit-keras distill --teacher_input fixed",
            bit_keras.distill,
            {"teacher_input": "fixed", "teacher": args.teacher},
        ),
    ]
    rows, teacher = [], None
    for short, label, command, verb, kwargs in methods:
        accuracies = []
        for seed in args.seeds:
            name = f"{short}-seed{seed}"
            result = verb(
                seed=seed, steps=args.steps, logdir=args.logdir, name=name, overwrite=True, verbose=0, **kwargs
            )
            accuracies.append(result.metrics["test_accuracy"])
            teacher = result.metrics.get("test_teacher_accuracy", teacher)
            print(f"{label}, seed {seed}: {accuracies[-1]:.4f}", flush=True)
        cells = " | ".join(f"{100 * a:.1f}%" for a in accuracies)
        rows.append(f"| {label} | `{command} --seed S` | {cells} | {_mean_std(accuracies)} |")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    table = [f"| student | command | {seeds} | mean ± std |", "|---" * (len(args.seeds) + 3) + "|", *rows]
    text = "\n".join(table) + f"\n\nTest accuracy of the {student} student; the teacher's: {100 * teacher:.1f}%.\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


def _mean_std(values):
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}%"


if __name__ == "__main__":
    main()
