"""`SavedModelLayer`: a Reusable SavedModel (bit_keras exports, TF Hub modules) as a trainable Keras 3 layer."""

import os

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="bit_keras")
class SavedModelLayer(keras.layers.Layer):
    """Calls a Reusable SavedModel (`obj(inputs, training=...)`) and trains its variables in Keras 3.

    `handle` is the SavedModel's path; `member` names a Reusable object inside it to use instead
    (`"feature_vector"`: the backbone of a bit_keras classification export).

    What `hub.KerasLayer` does for tf_keras (which Keras 3 models cannot hold), and what
    `keras.layers.TFSMLayer` does not: the SavedModel's own variables become this layer's weights
    under valid names (TFSMLayer keeps TensorFlow's ':0' suffix, which optimizers with slot variables
    such as SGD momentum or Adam reject), `training` reaches the SavedModel, and its
    `regularization_losses` are added to the layer's losses. `trainable=False` freezes them.
    Works inside a `tf.distribute` strategy scope; in a `.keras` file it stores the SavedModel handle (its path)
    (reloaded on load) and the current weight values.
    """

    def __init__(self, handle: str | os.PathLike, member: str | None = None, trainable: bool = True, **kwargs):
        super().__init__(trainable=trainable, **kwargs)
        self.handle = str(handle)
        self.member = member
        self.module = tf.saved_model.load(self.handle)
        if member is not None:
            if not hasattr(self.module, member):
                raise ValueError(f"{self.handle} has no member {member!r}")
            self.module = getattr(self.module, member)
        missing = [
            a for a in ("variables", "trainable_variables", "regularization_losses") if not hasattr(self.module, a)
        ]
        if missing or not callable(self.module):
            what = ", ".join(missing) or "__call__"
            raise ValueError(f"{self.handle} is not a Reusable SavedModel (no {what}); see bit_keras.export")
        trainable_ids = {id(v) for v in self.module.trainable_variables}
        # The same tf.Variables, wrapped: the SavedModel's functions keep reading and training them.
        self.saved_weights = [
            keras.Variable(v, trainable=id(v) in trainable_ids, name=v.name.split(":")[0].replace("/", "_"))
            for v in self.module.variables
        ]
        self.built = True

    def call(self, inputs, training=False):
        for loss in self.module.regularization_losses:
            self.add_loss(loss())
        return self.module(inputs, training=bool(training) and self.trainable)

    def get_config(self):
        return {**super().get_config(), "handle": self.handle, "member": self.member}
