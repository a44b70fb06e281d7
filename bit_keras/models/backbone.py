"""`BiTBackbone`: the BiT ResNet-v2 body (GroupNorm + Weight Standardization) as a keras-hub backbone."""

import keras
from keras import layers
from keras_hub.models import FeaturePyramidBackbone
from keras_hub.src.utils.preset_utils import register_presets

from bit_keras.checks import arg
from bit_keras.models import presets
from bit_keras.models.architecture import architecture_name, channels
from bit_keras.models.layers import (
    GN_GROUPS,
    NORMALIZATIONS,
    PreActBottleneck,
    conv_layer,
    norm_relu_layer,
    standardize_data_format,
)

STAGES = ("stem", "block1", "block2", "block3", "block4")  # `features`' names, then "final"


@keras.saving.register_keras_serializable(package="bit_keras")
class BiTBackbone(FeaturePyramidBackbone):
    """The BiT ResNet-v2 body: float32 RGB images in [0, 1] of any size (mapped to [-1, 1] inside) -> the feature
    map after the final group norm and ReLU, `[batch, height / 32, width / 32, 2048 * width]` (channels-last).

    Args:
        block_units: units per block, e.g. (3, 4, 6, 3) for R50.
        width: width factor (64 * width root channels, 2048 * width output channels); may be below 1.
        normalization: "group" (BiT) or "batch" (the paper's ablation).
        weight_standardization: standardize every convolution kernel (BiT) or not (the ablation).
        groups: group-norm groups.
        image_shape: the input shape (channels last: (height, width, 3)); None sizes accept any image size.
        data_format: "channels_last" or "channels_first" (default: Keras' image data format).
        dtype: a dtype policy (name, `keras.DTypePolicy` or `DTypePolicyMap`); group-norm and weight-standardization
            statistics are float32 whatever it is (float64 under a float64 policy).

    `pyramid_outputs` maps "P2".."P5" to block1..block4 (strides 4..32), keras-hub's feature pyramid (what
    `keras_hub.models.RetinaNetBackbone` takes); `features` maps "stem", "block1".."block4" to the same tensors
    and "final" to the output.
    """

    def __init__(
        self,
        block_units=(3, 4, 6, 3),
        width=1,
        normalization="group",
        weight_standardization=True,
        groups=GN_GROUPS,
        image_shape=(None, None, 3),
        data_format=None,
        dtype=None,
        **kwargs,
    ):
        data_format = standardize_data_format(data_format)
        # keras-hub's name for the class, without Keras' per-process "_<n>": equal models have equal configs.
        kwargs["name"] = kwargs.get("name") or "bi_t_backbone"
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"{arg('normalization')} must be one of {NORMALIZATIONS}, got {normalization!r}")
        images = keras.Input(shape=image_shape, dtype="float32", name="images")
        features = body(images, block_units, width, normalization, weight_standardization, groups, dtype, data_format)
        x = features["final"]
        super().__init__(inputs=images, outputs=x, dtype=dtype, **kwargs)

        self.block_units = tuple(block_units)
        self.width = width
        self.normalization = normalization
        self.weight_standardization = weight_standardization
        self.groups = groups
        self.image_shape = tuple(image_shape)
        self.data_format = data_format
        self.num_features = channels(width, 2048)
        self.features = features
        self.pyramid_outputs = {f"P{b + 1}": features[f"block{b}"] for b in range(1, len(block_units) + 1)}

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """keras-hub's `from_preset`: a preset directory (`save_to_preset`, a finished run folder), or a BiT preset by
        name or alias ("BiT-M-R50x1", "bit_m_r50x1") from its official `.npz` (downloaded, or from
        `pretrained_dir=` holding `NAME.npz`; `cache_dir=` for the download cache)."""
        found = presets.find(preset)
        if found is None:
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        return presets.load(cls, found, load_weights, **kwargs)

    @property
    def architecture(self) -> str:
        """The architecture's name, e.g. "R50x1"."""
        return architecture_name(self.block_units, self.width)

    def get_config(self):
        return {
            **super().get_config(),
            "block_units": self.block_units,
            "width": self.width,
            "normalization": self.normalization,
            "weight_standardization": self.weight_standardization,
            "groups": self.groups,
            "image_shape": self.image_shape,
            "data_format": self.data_format,
        }


def body(images, block_units, width, normalization, weight_standardization, groups, dtype, data_format):
    """BiT's layers on `images` (float32 in [0, 1]): `{"stem", "block1".."block4", "final"}` tensors, "final" after the
    last group norm and ReLU."""
    ws, fmt, root = weight_standardization, data_format, channels(width)
    if normalization == "group" and root % groups:  # here, so that `BiT` says it as `BiTBackbone` does
        raise ValueError(f"width={width} gives {root} root channels, not divisible into {groups} groups")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_minus_one_one", dtype=dtype)(images)  # [0,1] -> [-1,1]
    x = layers.ZeroPadding2D(3, data_format=fmt, name="root_pad", dtype=dtype)(x)
    x = conv_layer(root, 7, "root_conv", strides=2, weight_standardization=ws, dtype=dtype, data_format=fmt)(x)
    x = layers.ZeroPadding2D(1, data_format=fmt, name="root_pool_pad", dtype=dtype)(x)  # zeros, not -inf
    x = layers.MaxPooling2D(3, strides=2, padding="valid", data_format=fmt, name="stem", dtype=dtype)(x)
    features = {"stem": x}
    for b, units in enumerate(block_units, start=1):
        for u in range(1, units + 1):
            x = PreActBottleneck(
                root * 2 ** (b - 1),
                strides=2 if u == 1 and b > 1 else 1,  # the stride sits on unit01 of blocks 2-4
                normalization=normalization,
                weight_standardization=ws,
                groups=groups,
                data_format=fmt,
                name=f"block{b}_unit{u:02d}",
                dtype=dtype,
            )(x)
        features[f"block{b}"] = x
    features["final"] = norm_relu_layer(normalization, "pre_head_norm", groups, dtype, data_format=fmt)(x)
    return features


# keras-hub has no public way to register presets; its models register theirs so, in this module.
register_presets(presets.keras_hub_presets(), BiTBackbone)
