"""BiT as keras-hub ships image classifiers: `BiTImageConverter`, `BiTImageClassifierPreprocessor` and
`BiTImageClassifier` (global average pooling and a zero-initialized dense head on a `BiTBackbone`)."""

import keras
import numpy as np
from keras import layers
from keras_hub.layers import ImageConverter
from keras_hub.models import ImageClassifier, ImageClassifierPreprocessor, Task

from bit_keras.checks import arg
from bit_keras.models import presets
from bit_keras.models.backbone import BiTBackbone
from bit_keras.models.layers import PreActBottleneck, portable_ops

FEATURE_NAMES = ("stem", "block1", "block2", "block3", "block4", "pre_logits")


@keras.saving.register_keras_serializable(package="bit_keras")
class BiTImageConverter(ImageConverter):
    """Raw RGB images (uint8 values in [0, 255], any size) -> float32 in [0, 1] resized to `image_size` without
    keeping the aspect ratio (bilinear): BiT's evaluation preprocessing, the input convention of BiT models."""

    backbone_cls = BiTBackbone

    def __init__(self, image_size=None, scale=1 / 255, offset=None, crop_to_aspect_ratio=False, **kwargs):
        super().__init__(
            image_size=image_size, scale=scale, offset=offset, crop_to_aspect_ratio=crop_to_aspect_ratio, **kwargs
        )


@keras.saving.register_keras_serializable(package="bit_keras")
class BiTImageClassifierPreprocessor(ImageClassifierPreprocessor):
    """keras-hub's image classifier preprocessor with a `BiTImageConverter`."""

    backbone_cls = BiTBackbone
    image_converter_cls = BiTImageConverter


@keras.saving.register_keras_serializable(package="bit_keras")
class BiTImageClassifier(ImageClassifier):
    """A `BiTBackbone`, global average pooling and a dense head: float32 RGB images in [0, 1] -> logits.

    As keras-hub's `ImageClassifier`, with what BiT transfers with: the head is zero-initialized (a new head
    predicts uniformly; the paper's transfer recipe), computes in float32 under mixed precision (`head_dtype`), and
    `num_classes=0` has none (the pooled pre-logits are the output: a feature vector). The model carries its
    `class_names` (one per class, or None) and, through its preprocessor's image converter, its input size:
    `classifier.predict(raw_uint8_images)` and `fit(raw_images, labels)` resize and scale as it was trained; calling
    the model itself (and `predict` without a preprocessor) takes images already in [0, 1].
    """

    backbone_cls = BiTBackbone
    preprocessor_cls = BiTImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        class_names=None,
        pooling="avg",
        activation=None,
        dropout=0.0,
        head_dtype="float32",
        **kwargs,
    ):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"{arg('num_classes')} must be an int >= 0 (0: pooled features), got {num_classes!r}")
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes:
                raise ValueError(f"{len(class_names)} class names for a head of {num_classes} classes")
        if pooling != "avg":
            raise ValueError(f"BiT pools by average (pooling='avg'), got pooling={pooling!r}")
        # keras-hub's ImageClassifier.__init__, with a zero-initialized head that may be absent.
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooler = layers.GlobalAveragePooling2D(backbone.data_format, dtype=head_dtype, name="pooler")
        self.output_dropout = layers.Dropout(dropout, dtype=head_dtype, name="output_dropout")
        self.output_dense = None
        inputs = backbone.input
        pooled = self.pooler(backbone(inputs))
        x = self.output_dropout(pooled)
        if num_classes:
            self.output_dense = layers.Dense(
                num_classes,
                activation=activation,
                kernel_initializer="zeros",
                bias_initializer="zeros",
                dtype=head_dtype,
                name="predictions",
            )
            x = self.output_dense(x)
        Task.__init__(self, inputs=inputs, outputs=x, **kwargs)
        self.num_classes = num_classes
        self.class_names = class_names
        self.activation = activation
        self.pooling = pooling
        self.dropout = dropout
        self.head_dtype = head_dtype
        self.features = {k: v for k, v in backbone.features.items() if k != "final"} | {"pre_logits": pooled}

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """keras-hub's `from_preset`: a preset directory (`save_to_preset`, a finished run folder: its class names and
        input size come with it), or a BiT preset by name or alias ("BiT-M-R50x1-ILSVRC2012",
        "bit_m_r50x1_ilsvrc2012") from its official `.npz` (downloaded, or from `pretrained_dir=` holding `NAME.npz`;
        `cache_dir=` for the download cache, `labels=` a file of class names), with its label names and a
        preprocessor at its size; `num_classes=` a new zero-initialized head."""
        found = presets.find(preset)
        if found is None:
            return super().from_preset(preset, load_weights=load_weights, **kwargs)
        return presets.load(cls, found, load_weights, **kwargs)

    @property
    def image_size(self) -> int | None:
        """The side its preprocessor resizes images to (the size it was trained or released at), or None."""
        converter = getattr(self.preprocessor, "image_converter", None)
        size = converter.image_size if converter is not None else None
        return size[0] if size and size[0] == size[1] else None

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def pyramid_outputs(self):
        return self.backbone.pyramid_outputs

    @property
    def policy(self) -> str | None:
        """The backbone's dtype policy name when it is not plain float32, else None."""
        name = self.backbone.dtype_policy.name
        return None if name == "float32" else name

    def feature_extractor(self, names=FEATURE_NAMES) -> keras.Model:
        """A model sharing this one's weights that returns a dict of the named intermediate outputs: "stem",
        "block1".."block4", "P2".."P5" (as block1..block4) and "pre_logits" (the pooled features)."""
        tensors = self.features | self.pyramid_outputs
        unknown = sorted(set(names) - set(tensors))
        if unknown:
            raise ValueError(f"unknown feature names {unknown}; choose from {sorted(tensors)}")
        return keras.Model(self.input, {n: tensors[n] for n in names}, name=f"{self.name}_features")

    def with_new_head(self, num_classes: int, dtype=None, class_names=None) -> "BiTImageClassifier":
        """A copy with a new zero-initialized head of `num_classes` (0: pooled features), its backbone computing in
        `dtype` (a dtype policy) when given; the preprocessor is shared."""
        backbone = _copy_backbone(self.backbone, dtype=dtype)
        return BiTImageClassifier(
            backbone, num_classes, self.preprocessor, class_names, head_dtype=self.head_dtype, name=self.name
        )

    def fold_weight_standardization(self) -> "BiTImageClassifier":
        """A copy for inference whose plain convolutions hold the standardized kernels (this model when it has no
        weight standardization): the same outputs, without standardizing every kernel on every call. Train the
        original, not the copy: its kernels would not be standardized again after an update."""
        if not self.backbone.weight_standardization:
            return self
        backbone = _copy_backbone(self.backbone, weight_standardization=False)
        for ours, theirs in zip(_convolutions(self.backbone), _convolutions(backbone), strict=True):
            theirs.kernel.assign(ours.standardize(ours.kernel))
        folded = BiTImageClassifier(
            backbone, self.num_classes, self.preprocessor, self.class_names, head_dtype=self.head_dtype, name=self.name
        )
        if self.num_classes:
            folded.output_dense.set_weights(self.output_dense.get_weights())
        return folded

    def predict(self, x=None, batch_size=None, **kwargs):
        """keras-hub's `predict`; an array of no images gives an empty result (Keras 3 raises UnboundLocalError). On
        TensorFlow an array goes in as a `tf.data` dataset: keras-hub 0.32 feeds arrays through grain where it is
        installed, whose read options log a warning on every call."""
        if getattr(x, "shape", None) is None:  # a dataset: as it is
            return super().predict(x, batch_size=batch_size, **kwargs)
        if len(x.shape) > 0 and x.shape[0] == 0:
            return np.zeros((0, *self.output.shape[1:]), self.output.dtype)
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            batches = tf.data.Dataset.from_tensor_slices(x).batch(32 if batch_size is None else batch_size)
            return super().predict(batches, **kwargs)  # Keras' default batch of 32
        return super().predict(x, batch_size=batch_size, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """Keras' `Model.export`, traced with `portable_ops` (the SavedModel may be served on a GPU)."""
        with portable_ops():
            return super().export(filepath, *args, **kwargs)

    def get_config(self):
        head_dtype = self.head_dtype
        if isinstance(head_dtype, keras.DTypePolicy):
            head_dtype = keras.dtype_policies.serialize(head_dtype)
        return {**super().get_config(), "class_names": self.class_names, "head_dtype": head_dtype}

    @classmethod
    def from_config(cls, config):
        config = dict(config)  # keras-hub's `Task.from_config` puts the deserialized backbone into the dict it gets
        if isinstance(config.get("head_dtype"), dict):
            config["head_dtype"] = keras.dtype_policies.deserialize(config["head_dtype"])
        return super().from_config(config)


def _copy_backbone(backbone: BiTBackbone, **overrides) -> BiTBackbone:
    """A new `BiTBackbone` of `backbone`'s config with `overrides` (None values ignored) and its weights."""
    config = backbone.get_config() | {k: v for k, v in overrides.items() if v is not None}
    copy = BiTBackbone.from_config(config)
    copy.set_weights(backbone.get_weights())
    return copy


def _convolutions(backbone: BiTBackbone):
    """Every convolution of `backbone`, in model order."""
    for layer in backbone.layers:
        if isinstance(layer, PreActBottleneck):
            yield from (c for c in (layer.conv_a, layer.conv_b, layer.conv_c, layer.proj) if c is not None)
        elif isinstance(layer, layers.Conv2D):
            yield layer
