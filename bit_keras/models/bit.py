"""`BiT`, the earlier single-class BiT model (images in [0, 1] -> logits or pooled features): it loads the `.keras`
files earlier versions wrote and keeps its constructor; new code uses `BiTImageClassifier` and `BiTBackbone`, which
`to_classifier()` turns it into (same layers, same weights)."""

import keras
import numpy as np
from keras import layers

from bit_keras.checks import arg
from bit_keras.models.backbone import body
from bit_keras.models.layers import GN_GROUPS, NORMALIZATIONS, portable_ops

FEATURE_NAMES = ("stem", "block1", "block2", "block3", "block4", "pre_logits")


def check_policy(dtype) -> str | None:
    """The dtype policy name of `dtype` (None: no policy given); a one-line error unless Keras knows it."""
    if dtype is None:
        return None
    try:
        return keras.dtype_policies.get(dtype).name
    except ValueError:
        raise ValueError(f"{arg('dtype')} must be a Keras dtype policy (e.g. mixed_bfloat16), got {dtype!r}") from None


@keras.saving.register_keras_serializable(package="bit_keras")
class BiT(keras.Model):
    """A BiT ResNet-v2 taking float32 RGB images in [0, 1] of any size (mapped to [-1, 1] inside), as one model.

    Args:
        block_units: units per block, e.g. (3, 4, 6, 3) for R50.
        width: width factor (64 * width root channels, 2048 * width pre-logits); may be below 1.
        num_classes: logits of a head (a Dense layer, zero-initialized), or 0 for pooled pre-logits.
        normalization: "group" (BiT) or "batch" (the paper's ablation).
        weight_standardization: standardize every convolution kernel (BiT) or not (ablation).
        groups: group-norm groups.
        input_shape: (height, width, 3); None sizes accept any image size.
        dtype: a dtype policy name such as "mixed_bfloat16"; outputs stay float32.

    `features` maps "stem", "block1".."block4" and "pre_logits" to the model's intermediate tensors;
    `pyramid_outputs` maps "P2".."P5" to block1..block4 (strides 4..32).
    """

    def __init__(
        self,
        block_units: tuple[int, ...] = (3, 4, 6, 3),
        width: int | float = 1,
        num_classes: int = 1000,
        normalization: str = "group",
        weight_standardization: bool = True,
        groups: int = GN_GROUPS,
        input_shape: tuple[int | None, int | None, int] = (None, None, 3),
        dtype: str | None = None,
        **kwargs,
    ):
        policy = check_policy(dtype)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"{arg('normalization')} must be one of {NORMALIZATIONS}, got {normalization!r}")
        if num_classes is None or num_classes < 0:
            raise ValueError(f"{arg('num_classes')} must be an int >= 0 (0: pooled features), got {num_classes!r}")
        images = keras.Input(shape=input_shape, dtype="float32", name="images")
        features = body(images, block_units, width, normalization, weight_standardization, groups, dtype, None)
        x = layers.GlobalAveragePooling2D(name="pre_logits", dtype="float32")(features.pop("final"))
        features["pre_logits"] = x
        if num_classes:
            x = layers.Dense(
                num_classes, kernel_initializer="zeros", bias_initializer="zeros", name="head", dtype="float32"
            )(x)
        super().__init__(inputs=images, outputs=x, **kwargs)

        self.block_units = tuple(block_units)
        self.width = width
        self.num_classes = num_classes
        self.normalization = normalization
        self.weight_standardization = weight_standardization
        self.groups = groups
        self.image_shape = tuple(input_shape)
        self.policy = policy
        self.num_features = features["pre_logits"].shape[-1]
        self.features = features
        self.pyramid_outputs = {f"P{b + 1}": features[f"block{b}"] for b in range(1, len(block_units) + 1)}

    def to_classifier(self):
        """This model as a `BiTImageClassifier` (a `BiTBackbone` and a head named "predictions"), its weights copied."""
        from bit_keras.models.backbone import BiTBackbone
        from bit_keras.models.classifier import BiTImageClassifier

        backbone = BiTBackbone(
            self.block_units,
            self.width,
            self.normalization,
            self.weight_standardization,
            self.groups,
            self.image_shape,
            dtype=self.policy,
        )
        for layer in backbone.layers:
            if layer.weights:
                layer.set_weights(self.get_layer(layer.name).get_weights())
        classifier = BiTImageClassifier(backbone, self.num_classes, name=self.name)
        if self.num_classes:
            classifier.output_dense.set_weights(self.get_layer("head").get_weights())
        return classifier

    def feature_extractor(self, names=FEATURE_NAMES) -> keras.Model:
        """A model sharing this one's weights that returns a dict of the named intermediate outputs."""
        tensors = self.features | self.pyramid_outputs
        unknown = sorted(set(names) - set(tensors))
        if unknown:
            raise ValueError(f"unknown feature names {unknown}; choose from {sorted(tensors)}")
        return keras.Model(self.input, {n: tensors[n] for n in names}, name=f"{self.name}_features")

    def with_new_head(self, num_classes: int, dtype: str | None = None):
        """`to_classifier().with_new_head(...)`: a `BiTImageClassifier`."""
        return self.to_classifier().with_new_head(num_classes, dtype=dtype)

    def fold_weight_standardization(self):
        """`to_classifier().fold_weight_standardization()`: a `BiTImageClassifier`."""
        return self.to_classifier().fold_weight_standardization()

    def predict(self, x, *args, **kwargs):
        """Keras' `Model.predict`; an array of no images gives an empty result (Keras 3 raises UnboundLocalError)."""
        if getattr(x, "shape", None) is not None and len(x.shape) > 0 and x.shape[0] == 0:
            return np.zeros((0, *self.output.shape[1:]), self.output.dtype)
        return super().predict(x, *args, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """Keras' `Model.export`, traced with `portable_ops` (the SavedModel may be served on a GPU)."""
        with portable_ops():
            return super().export(filepath, *args, **kwargs)

    def get_config(self):
        return {
            "block_units": self.block_units,
            "width": self.width,
            "num_classes": self.num_classes,
            "normalization": self.normalization,
            "weight_standardization": self.weight_standardization,
            "groups": self.groups,
            "input_shape": self.image_shape,
            "dtype": self.policy,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
