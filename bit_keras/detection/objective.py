"""RetinaNet's training objective: focal loss on the class subnet, smooth L1 on the box subnet.

Ours, not keras-hub's `RetinaNetObjectDetector.compute_loss`: that ignores alpha (no class balancing), averages the
focal loss over the classes and normalizes by the positives of each (micro-)batch, where the paper sums over the
classes and the `Trainer` normalizes by the positives of the global batch (micro-batches and replicas alike).
"""

import keras
import tensorflow as tf

from bit_keras.detection.retinanet import IGNORED
from bit_keras.training.trainer import Objective

ALPHA, GAMMA = 0.25, 2.0  # focal loss: the paper's best setting
BOX_BETA = 0.1  # smooth L1's quadratic zone on the box deltas (Detectron2's RetinaNet)


class FocalLoss(Objective):
    """The paper's loss: focal loss (alpha 0.25, gamma 2) summed over every class of every anchor that is not
    ignored, plus smooth L1 summed over the box deltas of the positive anchors, both divided by the number of
    positive anchors (at least 1) of the global batch. Outputs are a `RetinaNet`'s (`bbox_regression`, `cls_logits`),
    targets `bit_keras.detection.pipeline`'s: `{"boxes": [B, A, 4] deltas, "classes": [B, A] class id, -1 background
    or -2 ignored}`. Reports `class_loss` and `box_loss`."""

    name = "coco_ap"  # the run's result is COCO AP, which `bit_keras.detection.finetune` adds at each evaluation

    def __init__(self, alpha: float = ALPHA, gamma: float = GAMMA, box_beta: float = BOX_BETA):
        self.alpha, self.gamma, self.box_beta = alpha, gamma, box_beta
        self.class_loss = keras.metrics.Mean(name="class_loss")
        self.box_loss = keras.metrics.Mean(name="box_loss")
        self.metrics = [self.class_loss, self.box_loss]

    def parts(self, targets, outputs):
        """The summed class and box losses of a batch."""
        logits, labels = outputs["cls_logits"], tf.cast(targets["classes"], tf.int32)
        num_classes = tf.shape(logits)[-1]
        one_hot = tf.one_hot(labels, num_classes)  # background (-1) and ignored (-2) anchors: all zeros
        # `apply_class_balancing`, or Keras ignores alpha; Keras averages over the classes, the paper sums.
        focal = keras.losses.binary_focal_crossentropy(
            one_hot, logits, apply_class_balancing=True, alpha=self.alpha, gamma=self.gamma, from_logits=True
        ) * tf.cast(num_classes, tf.float32)
        class_sum = tf.reduce_sum(focal * tf.cast(labels != IGNORED, tf.float32))
        # Huber(beta) / beta is smooth L1 with quadratic zone beta; Keras averages the 4 coordinates, we sum.
        box = keras.losses.huber(targets["boxes"], outputs["bbox_regression"], delta=self.box_beta)
        box *= 4.0 / self.box_beta
        box_sum = tf.reduce_sum(box * tf.cast(labels >= 0, tf.float32))
        return class_sum, box_sum

    def loss_sum(self, targets, outputs):
        return tf.add_n(self.parts(targets, outputs))

    def count(self, targets):
        return tf.reduce_sum(tf.cast(targets["classes"] >= 0, tf.float32))

    def update_metrics(self, targets, outputs):
        class_sum, box_sum = self.parts(targets, outputs)
        positives = tf.maximum(self.count(targets), 1.0)  # weights: the sums over every batch / their positives
        self.class_loss.update_state(class_sum / positives, sample_weight=positives)
        self.box_loss.update_state(box_sum / positives, sample_weight=positives)
