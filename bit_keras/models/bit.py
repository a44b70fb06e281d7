"""The BiT (ResNet-v2, GroupNorm + Weight Standardization) functional model."""

import keras
import numpy as np
from keras import layers

from bit_keras.checks import arg
from bit_keras.models.layers import (
    GN_GROUPS,
    NORMALIZATIONS,
    PreActBottleneck,
    conv_layer,
    norm_relu_layer,
    portable_ops,
)
from bit_keras.models.zoo import channels

FEATURE_NAMES = ("stem", "block1", "block2", "block3", "block4", "pre_logits")
# Float32 weights computing in float32 or (mixed precision) bfloat16/float16; pure float16, bfloat16 or float64
# weights are refused (GroupNorm and weight standardization are not built for them).
POLICIES = (None, "float32", "mixed_bfloat16", "mixed_float16")


def check_policy(dtype) -> str | None:
    """The dtype policy name of `dtype` (None: float32 without a policy); a one-line error unless in `POLICIES`."""
    policy = keras.dtype_policies.get(dtype).name if dtype is not None else None
    if policy not in POLICIES:
        raise ValueError(
            f"{arg('dtype')} must be one of {[p for p in POLICIES if p]} (a Keras dtype policy), got {dtype!r}"
        )
    return policy


@keras.saving.register_keras_serializable(package="bit_keras")
class BiT(keras.Model):
    """A BiT ResNet-v2 taking float32 RGB images in [0, 1] of any size (mapped to [-1, 1] inside).

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
    `pyramid_outputs` maps "P2".."P5" to block1..block4 (strides 4..32), as keras-hub's backbones name their
    feature pyramid, so a BiT serves as keras-hub's image encoder; `feature_extractor()` turns either's
    tensors into a model.
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
        root = channels(width)
        if normalization == "group" and root % groups:
            raise ValueError(f"width={width} gives {root} root channels, not divisible into {groups} groups")
        ws = weight_standardization

        images = keras.Input(shape=input_shape, dtype="float32", name="images")
        x = layers.Rescaling(2.0, offset=-1.0, name="to_minus_one_one", dtype=dtype)(images)  # [0,1] -> [-1,1]
        x = layers.ZeroPadding2D(3, name="root_pad", dtype=dtype)(x)
        x = conv_layer(root, 7, "root_conv", strides=2, weight_standardization=ws, dtype=dtype)(x)
        x = layers.ZeroPadding2D(1, name="root_pool_pad", dtype=dtype)(x)  # zeros, not -inf, as the official code
        x = layers.MaxPooling2D(3, strides=2, padding="valid", name="stem", dtype=dtype)(x)
        features = {"stem": x}
        for b, units in enumerate(block_units, start=1):
            for u in range(1, units + 1):
                x = PreActBottleneck(
                    root * 2 ** (b - 1),
                    strides=2 if u == 1 and b > 1 else 1,  # the stride sits on unit01 of blocks 2-4
                    normalization=normalization,
                    weight_standardization=ws,
                    groups=groups,
                    name=f"block{b}_unit{u:02d}",
                    dtype=dtype,
                )(x)
            features[f"block{b}"] = x
        x = norm_relu_layer(normalization, "pre_head_norm", groups, dtype)(x)
        x = layers.GlobalAveragePooling2D(name="pre_logits", dtype="float32")(x)
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

    def feature_extractor(self, names: tuple[str, ...] | list[str] = FEATURE_NAMES) -> keras.Model:
        """A model sharing this one's weights that returns a dict of the named intermediate outputs."""
        tensors = self.features | self.pyramid_outputs
        unknown = sorted(set(names) - set(tensors))
        if unknown:
            raise ValueError(f"unknown feature names {unknown}; choose from {sorted(tensors)}")
        return keras.Model(self.input, {n: tensors[n] for n in names}, name=f"{self.name}_features")

    def with_new_head(self, num_classes: int, dtype: str | None = None) -> "BiT":
        """A copy of this model with a new zero-initialized head of `num_classes` (0: pooled features), computing
        in `dtype` (a dtype policy name) when given."""
        overrides = {"num_classes": num_classes} | ({"dtype": dtype} if dtype is not None else {})
        model = BiT.from_config({**self.get_config(), **overrides})
        for layer in self.layers:
            if layer.name != "head" and layer.weights:
                model.get_layer(layer.name).set_weights(layer.get_weights())
        return model

    def fold_weight_standardization(self) -> "BiT":
        """A copy for inference whose plain convolutions hold the standardized kernels (this model when it
        has no weight standardization).

        Same outputs, without standardizing every kernel on every call (faster inference at small batches; the
        README's performance section has the numbers). Train the original, not the copy: its kernels would not
        be standardized again after an update.
        """
        if not self.weight_standardization:
            return self
        folded = BiT.from_config({**self.get_config(), "weight_standardization": False})
        folded.set_weights(self.get_weights())
        for ours, theirs in zip(self._convolutions(), folded._convolutions(), strict=True):
            theirs.kernel.assign(ours.standardize(ours.kernel))
        return folded

    def _convolutions(self):
        """Every convolution, in model order."""
        for layer in self.layers:
            if isinstance(layer, PreActBottleneck):
                yield from (c for c in (layer.conv_a, layer.conv_b, layer.conv_c, layer.proj) if c is not None)
            elif isinstance(layer, layers.Conv2D):
                yield layer

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
