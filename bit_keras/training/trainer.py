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


class Trainer(keras.Model):
    """Trains `model` (images -> logits) with softmax cross-entropy on one-hot or soft (MixUp) targets, or
    sigmoid cross-entropy on multi-hot targets (`loss="sigmoid"`), plus optional L2 `weight_decay`.

    `batch_split=N` cuts each replica's batch into N micro-batches whose gradients are summed before
    one optimizer update: the same update as the whole batch (up to float summation order), in 1/N
    of the activation memory. (Keras' `gradient_accumulation_steps` cannot do this under
    MirroredStrategy: it merges inside a cond.) Metrics: `loss` (cross-entropy, weight decay and the
    model's regularization losses) and top-1 `accuracy` against the targets' argmax, or
    `precision_at_1` for sigmoid.

    Create and compile it (`compile_sgd`, or `compile` with only an optimizer) inside the strategy's scope.
    """

    def __init__(self, model, batch_split=1, loss="softmax", weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(batch_split, int) or batch_split < 1:
            raise ValueError(f"batch_split must be a positive integer, got {batch_split!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.model = model
        self.batch_split = batch_split
        self.loss_name = loss
        self.weight_decay = weight_decay
        # L2 weight decay on the trainable kernels (convolutions and head), not on GroupNorm's gamma/beta
        # or biases: weight_decay * sum(||w||^2) / 2 joins the loss, as in the TPU ResNet code BiT builds on.
        self.decayed = [w for w in model.trainable_weights if w.name == "kernel"] if weight_decay else []
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # softmax: top-1 against the targets' argmax; sigmoid (multi-label): whether the top-1 class is a positive.
        self.accuracy = (
            keras.metrics.CategoricalAccuracy(name="accuracy")
            if loss == "softmax"
            else keras.metrics.Mean(name="precision_at_1")
        )
        self.built = True  # nothing of its own to build: `model` is

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, images, training=False):
        return self.model(images, training=training)

    def train_step(self, data):
        images, targets = data
        variables = self.trainable_variables
        n = self.batch_split
        if images.shape[0] is not None and images.shape[0] % n:
            raise ValueError(f"the per-replica batch {images.shape[0]} is not divisible by batch_split={n}")
        if n == 1:
            loss, gradients, logits = self._loss_and_gradients(images, targets, variables)
        else:
            batch = tf.shape(images)[0]
            divisible = tf.debugging.assert_equal(
                batch % n, 0, message=f"the per-replica batch must be divisible by batch_split={n}"
            )
            with tf.control_dependencies([divisible]):
                batch = tf.identity(batch)
            micro_images = tf.reshape(images, tf.concat([[n, batch // n], tf.shape(images)[1:]], 0))
            micro_targets = tf.reshape(targets, tf.concat([[n, batch // n], tf.shape(targets)[1:]], 0))

            def step(i, loss, gradients, logits):
                micro_loss, micro_gradients, micro_logits = self._loss_and_gradients(
                    micro_images[i], micro_targets[i], variables
                )
                gradients = [a + g for a, g in zip(gradients, micro_gradients)]
                return i + 1, loss + micro_loss, gradients, logits.write(i, micro_logits)

            _, loss, gradients, logits = tf.while_loop(
                lambda i, *_: i < n,
                step,
                (
                    tf.constant(0),
                    tf.constant(0.0),
                    [tf.zeros_like(v) for v in variables],
                    tf.TensorArray(tf.float32, size=n),
                ),
            )
            logits = logits.concat()
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self._update_metrics(loss, targets, logits)

    def test_step(self, data):
        images, targets = data
        logits = self(images, training=False)
        return self._update_metrics(self._loss(targets, logits), targets, logits)

    def _loss(self, targets, logits):
        """The mean cross-entropy of this (micro-)batch plus weight decay and the model's regularization losses.

        softmax: categorical cross-entropy on one-hot or soft targets; sigmoid: binary cross-entropy summed
        over the classes of multi-hot targets (multi-label data such as ImageNet-21k), averaged over examples.
        """
        if self.loss_name == "softmax":
            per_example = keras.losses.categorical_crossentropy(targets, logits, from_logits=True)
        else:
            per_example = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits), axis=-1)
        extra = [tf.cast(x, tf.float32) for x in self.losses]
        if self.decayed:
            extra.append(self.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in self.decayed]))
        return tf.reduce_mean(per_example) + tf.add_n([tf.constant(0.0)] + extra)

    def _loss_and_gradients(self, images, targets, variables):
        """The loss of one of `batch_split` micro-batches as a share of the step's loss, its gradients and logits."""
        with tf.GradientTape() as tape:
            logits = tf.cast(self(images, training=True), tf.float32)
            loss = self._loss(targets, logits) / self.batch_split
            # Gradients are summed over replicas: each contributes its share of the global mean.
            replica_share = loss / tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(replica_share)  # loss scaling under mixed_float16
        return loss, tape.gradient(scaled, variables), logits

    def _update_metrics(self, loss, targets, logits):
        # After the data: counts of static batch sizes would otherwise also run on the step that finds
        # a finite dataset exhausted, and count a batch that never came.
        with tf.control_dependencies([logits]):
            self.loss_tracker.update_state(loss, sample_weight=tf.shape(logits)[0])
            if self.loss_name == "softmax":
                self.accuracy.update_state(targets, logits)
            else:
                top1 = tf.gather(targets, tf.argmax(logits, axis=-1), batch_dims=1)
                self.accuracy.update_state(tf.cast(top1 > 0, tf.float32))
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
