"""`Trainer`: a classifier wrapped for `model.fit` with micro-batched steps under any `tf.distribute` strategy."""

import keras
import tensorflow as tf

from bit_keras.training.strategy import is_multi_worker

LOSSES = ("softmax", "sigmoid")
MIXED_PRECISION = {None: None, "none": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def mixed_precision_policy(mixed_precision):
    """The Keras dtype policy name (None: float32) of a `mixed_precision` choice: None/"none", "bfloat16", "float16"."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {[k for k in MIXED_PRECISION if k]}, got {mixed_precision!r}")
    return MIXED_PRECISION[mixed_precision]


def loss_for_labels(label_spec):
    """ "softmax" for single-label examples (an integer class id), "sigmoid" for multi-label ones (a multi-hot
    vector per example, as ImageNet-21k's), from the `tf.TensorSpec` of one unbatched label."""
    shape = label_spec.shape
    if shape.rank == 0 and label_spec.dtype.is_integer:
        return "softmax"
    if shape.rank == 1:
        return "sigmoid"
    raise ValueError(f"labels must be class ids (scalars) or multi-hot vectors, got {label_spec}")


@keras.saving.register_keras_serializable(package="bit_keras")
class MomentumSGD(keras.optimizers.SGD):
    """Keras' SGD whose (non-Nesterov) momentum update is TensorFlow's fused kernel: `m = momentum * m - lr * g;
    w += m`, bit-identical to Keras' five ops in one kernel per weight (about twice as fast)."""

    def update_step(self, gradient, variable, learning_rate):
        if not self.momentum or self.nesterov:
            return super().update_step(gradient, variable, learning_rate)
        momentum = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=momentum.value.handle,
            lr=tf.cast(learning_rate, variable.dtype),
            grad=tf.cast(gradient, variable.dtype),
            momentum=tf.cast(self.momentum, variable.dtype),
        )


class Objective:
    """What a `Trainer` minimizes and reports besides the loss: `Classification` here, detection's focal loss in
    `bit_keras.detection.objective`.

    The loss is `loss_sum(targets, outputs)`, summed over the examples (or anchors) of a batch, divided by
    `count(targets)` of the whole global batch (its examples, or positive anchors; at least 1), so that
    micro-batches (`batch_split`) and replicas add up to the loss of the global batch.
    """

    name: str  # what metrics.json's "metric" names
    metrics: list  # Keras metrics updated by `update_metrics`; created in the strategy's scope

    def loss_sum(self, targets, outputs):
        raise NotImplementedError

    def count(self, targets):
        """What the loss sum of `targets` counts (summed over replicas): by default its examples (detection: its
        positive anchors)."""
        return tf.cast(tf.shape(targets)[0], tf.float32)

    def update_metrics(self, targets, outputs):
        raise NotImplementedError

    def scores(self, logs, prefix=""):
        """The evaluation entries of the metrics in Keras `logs` (`prefix` "val_" for the test set's), by the
        name they have in `evals` without "train_"/"test_"."""
        return {metric.name: float(logs[prefix + metric.name]) for metric in self.metrics}


class Classification(Objective):
    """Softmax cross-entropy on one-hot or soft (MixUp) targets with top-1 `accuracy` against the targets' argmax,
    or (`loss="sigmoid"`) binary cross-entropy summed over the classes of multi-hot targets (multi-label data such
    as ImageNet-21k) with `precision_at_1`: whether the top-1 class is a positive."""

    def __init__(self, loss="softmax"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.accuracy = (
            keras.metrics.CategoricalAccuracy(name="accuracy")
            if loss == "softmax"
            else keras.metrics.Mean(name="precision_at_1")
        )
        self.metrics = [self.accuracy]
        self.name = self.accuracy.name

    def loss_sum(self, targets, logits):
        if self.loss == "softmax":
            per_example = keras.losses.categorical_crossentropy(targets, logits, from_logits=True)
        else:
            per_example = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits), axis=-1)
        return tf.reduce_sum(per_example)

    def update_metrics(self, targets, logits):
        if self.loss == "softmax":
            self.accuracy.update_state(targets, logits)
        else:
            top1 = tf.gather(targets, tf.argmax(logits, axis=-1), batch_dims=1)
            self.accuracy.update_state(tf.cast(top1 > 0, tf.float32))

    def scores(self, logs, prefix=""):
        return {"accuracy": float(logs[prefix + self.accuracy.name])}  # precision@1 too, as "accuracy"


class Trainer(keras.Model):
    """Trains `model` on an `Objective` (`loss`: one, or "softmax"/"sigmoid" for `Classification`), plus optional
    L2 `weight_decay`.

    `batch_split=N` cuts each replica's batch into N micro-batches whose gradients are summed before
    one optimizer update: the same update as the whole batch (up to float summation order), in 1/N
    of the activation memory. (Keras' `gradient_accumulation_steps` cannot do this under
    MirroredStrategy: it merges inside a cond.) Metrics: `loss` (the objective's, weight decay and the
    model's regularization losses) and the objective's.

    Create and compile it (`compile_sgd`, or `compile` with only an optimizer) inside the strategy's scope.
    """

    def __init__(self, model, batch_split=1, loss="softmax", weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(batch_split, int) or batch_split < 1:
            raise ValueError(f"batch_split must be a positive integer, got {batch_split!r}")
        self.model = model
        self.batch_split = batch_split
        self.objective = Classification(loss) if isinstance(loss, str) else loss
        self.weight_decay = weight_decay
        # L2 weight decay on the trainable kernels (convolutions and head), not on GroupNorm's gamma/beta
        # or biases: weight_decay * sum(||w||^2) / 2 joins the loss, as in the TPU ResNet code BiT builds on.
        self.decayed = [w for w in model.trainable_weights if w.name == "kernel"] if weight_decay else []
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True  # nothing of its own to build: `model` is

    @property
    def metrics(self):
        return [self.loss_tracker, *self.objective.metrics]

    def call(self, images, training=False):
        return self.model(images, training=training)

    def train_step(self, data):
        images, targets = data
        variables = self.trainable_variables
        n = self.batch_split
        size = tf.nest.flatten(images)[0].shape[0]  # images: a batch, or a structure of them (a model's inputs)
        if size is not None and size % n:
            raise ValueError(f"the per-replica batch {size} is not divisible by batch_split={n}")
        normalizer = self._normalizer(targets, across_replicas=True)  # shared by the micro-batches
        if n == 1:
            loss, gradients, outputs = self._loss_and_gradients(images, targets, variables, normalizer)
        else:
            batch = tf.shape(tf.nest.flatten(images)[0])[0]
            divisible = tf.debugging.assert_equal(
                batch % n, 0, message=f"the per-replica batch must be divisible by batch_split={n}"
            )
            with tf.control_dependencies([divisible]):
                batch = tf.identity(batch)
            split = lambda x: tf.reshape(x, tf.concat([[n, batch // n], tf.shape(x)[1:]], 0))
            micro_images, micro_targets = tf.nest.map_structure(split, images), tf.nest.map_structure(split, targets)
            output_spec = tf.nest.map_structure(lambda x: tf.TensorArray(tf.float32, size=n), self.model.output)

            def step(i, loss, gradients, outputs):
                micro_loss, micro_gradients, micro_outputs = self._loss_and_gradients(
                    tf.nest.map_structure(lambda x: x[i], micro_images),
                    tf.nest.map_structure(lambda x: x[i], micro_targets),
                    variables,
                    normalizer,
                )
                gradients = [a + g for a, g in zip(gradients, micro_gradients)]
                outputs = tf.nest.map_structure(lambda array, x: array.write(i, x), outputs, micro_outputs)
                return i + 1, loss + micro_loss, gradients, outputs

            _, loss, gradients, outputs = tf.while_loop(
                lambda i, *_: i < n,
                step,
                (tf.constant(0), tf.constant(0.0), [tf.zeros_like(v) for v in variables], output_spec),
            )
            outputs = tf.nest.map_structure(lambda array: array.concat(), outputs)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self._update_metrics(loss, normalizer, targets, outputs)

    def test_step(self, data):
        images, targets = data
        outputs = self._float32(self(images, training=False))
        normalizer = self._normalizer(targets)
        return self._update_metrics(self._loss(targets, outputs, normalizer), normalizer, targets, outputs)

    def _normalizer(self, targets, across_replicas=False):
        """What this replica divides its loss sum by: the objective's count of the global batch (at least 1) over
        the replicas, so that their losses add up to the global batch's (`across_replicas`), else of `targets`."""
        count = tf.cast(self.objective.count(targets), tf.float32)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync if across_replicas else 1
        if replicas > 1:
            count = tf.distribute.get_replica_context().all_reduce("sum", count)
        return tf.maximum(count, 1.0) / replicas

    def _loss(self, targets, outputs, normalizer=None, share=1.0):
        """The objective's loss of this (micro-)batch as a share of the batch's (of `normalizer`, default this
        batch's), plus that `share` of the weight decay and the model's regularization losses."""
        normalizer = self._normalizer(targets) if normalizer is None else normalizer
        extra = [tf.cast(x, tf.float32) for x in self.losses]
        if self.decayed:
            extra.append(self.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in self.decayed]))
        extra = tf.add_n([tf.constant(0.0)] + extra)
        return self.objective.loss_sum(targets, outputs) / normalizer + extra * share

    def _loss_and_gradients(self, images, targets, variables, normalizer=None):
        """The loss of one of `batch_split` micro-batches as a share of the step's loss, its gradients and outputs."""
        with tf.GradientTape() as tape:
            outputs = self._float32(self(images, training=True))
            loss = self._loss(targets, outputs, normalizer, share=1.0 / self.batch_split)
            # Gradients are summed over replicas: each contributes its share of the global mean.
            replica_share = loss / tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(replica_share)  # loss scaling under mixed_float16
        return loss, tape.gradient(scaled, variables), outputs

    @staticmethod
    def _float32(outputs):
        return tf.nest.map_structure(lambda x: tf.cast(x, tf.float32), outputs)

    def _update_metrics(self, loss, normalizer, targets, outputs):
        # The loss weighted by what it was divided by, so that the logged loss is the loss sum over the examples
        # (or positive anchors) seen, divided by their count, on any number of replicas.
        # After the data: counts of static batch sizes would otherwise also run on the step that finds
        # a finite dataset exhausted, and count a batch that never came.
        with tf.control_dependencies(tf.nest.flatten(outputs)[:1]):
            self.loss_tracker.update_state(loss, sample_weight=normalizer)
            self.objective.update_metrics(targets, outputs)
        logs = {m.name: m.result() for m in self.metrics}
        if is_multi_worker(tf.distribute.get_strategy()):
            # keras#20585: Keras averages multi-worker logs with reduce(MEAN, axis=0), which needs a batch axis.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # keras#20585: Keras builds from a first batch by reducing it across replicas eagerly, which
        # MultiWorkerMirroredStrategy cannot do. Nothing needs building here: the model is functional,
        # there is no compiled loss or metric, and `compile_sgd` creates the optimizer's state.
        pass

    def compile_sgd(self, schedule, momentum, jit_compile=False):
        """Compile with SGD + momentum on `schedule` (loss-scaled when the model computes in float16) and
        create the optimizer's variables, so that a checkpoint can be loaded before `fit`."""
        optimizer = MomentumSGD(schedule, momentum=momentum)
        if any(layer.dtype_policy.name == "mixed_float16" for layer in self.model.layers):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.compile(optimizer=optimizer, jit_compile=jit_compile)
        self.optimizer.build(self.trainable_variables)
