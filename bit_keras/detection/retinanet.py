"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") on a BiT backbone: the paper's detection
transfer, as keras-hub's `RetinaNetObjectDetector`.

keras-hub's: the task (`RetinaNetObjectDetector`: its output names, `decode_predictions`, `predict`, presets), the
backbone's layout (`RetinaNetBackbone`: the BiT's C3-C5 through keras-hub's `FeaturePyramid` to P3-P7, P6 from C5,
P7 after a ReLU), the anchors (`AnchorGenerator`: 9 per location, 3 scales x 3 aspect ratios, 4 x stride), the
training targets (`RetinaNetLabelEncoder`: IoU >= 0.5 positive, < 0.4 background, ignored between) and the subnets
(`PredictionHead`). Ours, each where the paper's recipe needs what keras-hub 0.32 lacks: the pyramid's and subnets'
widths (keras-hub fixes 256), the subnets' initialization (normal, stddev 0.01; the 0.01 prior on the class subnet,
where keras-hub puts it on the box subnet) and per-class non-max suppression of a whole batch (`PerClassSuppression`).
The loss is `bit_keras.detection.objective.FocalLoss`.
"""

import os

import keras
import tensorflow as tf
from keras import ops
from keras_hub.layers import AnchorGenerator, RetinaNetImageConverter
from keras_hub.models import RetinaNetBackbone, RetinaNetObjectDetector, RetinaNetObjectDetectorPreprocessor

# keras-hub exports no public name for these parts of its RetinaNet (pinned by the keras-hub 0.32.x requirement).
from keras_hub.src.models.retinanet.feature_pyramid import FeaturePyramid
from keras_hub.src.models.retinanet.prediction_head import PredictionHead
from keras_hub.src.models.retinanet.retinanet_label_encoder import RetinaNetLabelEncoder

from bit_keras.checks import arg

MIN_LEVEL, MAX_LEVEL = 3, 7  # pyramid levels P3-P7 (strides 8-128)
NUM_SCALES, ASPECT_RATIOS, ANCHOR_SIZE = 3, (0.5, 1.0, 2.0), 4  # anchors 4 x stride x 2^(k/3), k = 0, 1, 2
POSITIVE_IOU, NEGATIVE_IOU = 0.5, 0.4  # anchors matched at IoU >= 0.5, background below 0.4, ignored between
BOX_ENCODING = "center_xywh"  # box targets: center offsets / anchor size and log size ratios (what keras-hub decodes)
BACKGROUND, IGNORED = -1, -2  # class targets of unmatched and ignored anchors
SCORE_THRESHOLD, MAX_DETECTIONS, CANDIDATES = 0.05, 100, 1000  # decoding's defaults: COCO's evaluation settings


def paper_anchor_generator() -> AnchorGenerator:
    """keras-hub's anchor generator with the paper's anchors, boxes (ymin, xmin, ymax, xmax) in pixels."""
    return AnchorGenerator(
        "yxyx",
        min_level=MIN_LEVEL,
        max_level=MAX_LEVEL,
        num_scales=NUM_SCALES,
        aspect_ratios=list(ASPECT_RATIOS),
        anchor_size=ANCHOR_SIZE,
    )


def paper_label_encoder() -> RetinaNetLabelEncoder:
    """keras-hub's encoder of training targets: each anchor matched by IoU to a ground-truth box (pixels, yxyx)
    gets its class and box deltas (`BOX_ENCODING`), or the `BACKGROUND` or `IGNORED` class."""
    return RetinaNetLabelEncoder(
        paper_anchor_generator(),
        bounding_box_format="yxyx",
        encoding_format=BOX_ENCODING,
        positive_threshold=POSITIVE_IOU,
        negative_threshold=NEGATIVE_IOU,
        background_class=BACKGROUND,
        ignore_class=IGNORED,
    )


def check_options(
    image_size, fpn_channels, head_channels, head_depth, head_norm, num_classes=1, prior_probability=0.01, flags=None
):
    """One-line errors for detector settings a `RetinaNet` cannot have (`flags` renames them, e.g. "resolution" for
    image_size)."""
    flags = flags or {}
    name = lambda key: arg(flags.get(key, key))
    sizes = {"num_classes": num_classes, "image_size": image_size, "fpn_channels": fpn_channels}
    sizes |= {"head_channels": head_channels, "head_depth": head_depth}
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name(key)} must be a positive integer, got {value!r}")
    if image_size % 2**MAX_LEVEL:
        stride = 2**MAX_LEVEL
        raise ValueError(f"{name('image_size')} must be a multiple of {stride} (the coarsest stride), got {image_size}")
    if head_norm and head_channels % 32:
        raise ValueError(
            f"{name('head_norm')} uses 32 groups: {name('head_channels')} must be a multiple of 32, got {head_channels}"
        )
    number = isinstance(prior_probability, int | float) and not isinstance(prior_probability, bool)
    if not (number and 0 < prior_probability < 1):
        raise ValueError(f"{name('prior_probability')} must be a number in (0, 1), got {prior_probability!r}")


@keras.saving.register_keras_serializable(package="bit_keras")
class BiTRetinaNetBackbone(RetinaNetBackbone):
    """keras-hub's `RetinaNetBackbone` (images -> pyramid levels P3..P7) with a pyramid of `fpn_channels`, which
    keras-hub fixes at 256; `image_encoder` is a `BiTBackbone`, `image_shape` the detector's (square) input."""

    def __init__(
        self,
        image_encoder,
        min_level=MIN_LEVEL,
        max_level=MAX_LEVEL,
        use_p5=True,
        fpn_channels=256,
        use_fpn_batch_norm=False,
        image_shape=(None, None, 3),
        dtype=None,
        **kwargs,
    ):
        # keras-hub's RetinaNetBackbone.__init__, with `num_filters`.
        deepest = min(max_level, 5)  # the BiT's levels end at P5 (C5, stride 32); the pyramid adds the rest
        levels = {f"P{level}": image_encoder.pyramid_outputs[f"P{level}"] for level in range(min_level, deepest + 1)}
        features = keras.Model(image_encoder.inputs, levels, name="backbone")
        pyramid = FeaturePyramid(
            min_level, max_level, use_p5, fpn_channels, use_batch_norm=use_fpn_batch_norm, dtype=dtype, name="fpn"
        )
        images = keras.Input(image_shape, name="inputs")
        outputs = pyramid(features(images))
        super(RetinaNetBackbone, self).__init__(inputs=images, outputs=outputs, dtype=dtype, **kwargs)
        # The BiT's final norm (after C5) feeds no level: no gradient reaches it, so it is not trained.
        image_encoder.get_layer("pre_head_norm").trainable = False
        self.min_level, self.max_level, self.use_p5 = min_level, max_level, use_p5
        self.fpn_channels, self.use_fpn_batch_norm = fpn_channels, use_fpn_batch_norm
        self.image_encoder, self.feature_pyramid = image_encoder, pyramid
        self.image_shape = tuple(image_shape)
        self.pyramid_outputs = outputs

    def get_config(self):
        return {**super().get_config(), "fpn_channels": self.fpn_channels}


@keras.saving.register_keras_serializable(package="bit_keras")
class PerClassSuppression(keras.layers.Layer):
    """A RetinaNet's `prediction_decoder` as keras-hub's `NonMaxSuppression` (the same arguments, call and outputs)
    with the paper's per-class suppression, of a whole batch in one op (`tf.image.combined_non_max_suppression`;
    keras-hub's suppression is class-agnostic and needs a static batch size).

    The `candidates` best (anchor, class) scores of each image above `confidence_threshold` are suppressed per class
    at `iou_threshold`; at most `max_detections` remain, best first: `{"boxes" [B, max_detections, 4] (clipped to the
    image, in `bounding_box_format`), "confidence", "labels", "num_detections" [B]}`, padded with -1 as keras-hub's.
    """

    def __init__(
        self,
        bounding_box_format="rel_yxyx",
        from_logits=True,
        iou_threshold=0.5,
        confidence_threshold=SCORE_THRESHOLD,
        max_detections=MAX_DETECTIONS,
        candidates=CANDIDATES,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.bounding_box_format = bounding_box_format
        self.from_logits = from_logits
        self.iou_threshold = iou_threshold
        self.confidence_threshold = confidence_threshold
        self.max_detections = max_detections
        self.candidates = candidates
        self.built = True

    def call(self, box_prediction, class_prediction, images=None):
        height, width = (None, None) if images is None else ops.shape(images)[1:3]

        def convert(boxes, source, target):
            same = source == target
            return boxes if same else keras.utils.bounding_boxes.convert_format(boxes, source, target, height, width)

        boxes = convert(box_prediction, self.bounding_box_format, "rel_yxyx")
        scores = ops.sigmoid(class_prediction) if self.from_logits else class_prediction
        num_anchors, num_classes = scores.shape[1], scores.shape[2]
        flat = ops.reshape(scores, (-1, num_anchors * num_classes))
        top_scores, top = ops.top_k(flat, min(self.candidates, num_anchors * num_classes))
        top_boxes = ops.take_along_axis(boxes, (top // num_classes)[..., None], axis=1)
        kept = tf.image.combined_non_max_suppression(
            top_boxes[:, :, None, :],  # one box per candidate, shared by the classes
            ops.one_hot(top % num_classes, num_classes) * top_scores[..., None],  # its score in its class only
            max_output_size_per_class=self.max_detections,
            max_total_size=self.max_detections,
            iou_threshold=self.iou_threshold,
            score_threshold=self.confidence_threshold,
            clip_boxes=True,
        )
        found = ops.arange(self.max_detections)[None, :] < kept.valid_detections[:, None]
        boxes = convert(kept.nmsed_boxes, "rel_yxyx", self.bounding_box_format)
        return {
            "boxes": ops.where(found[..., None], boxes, -1.0),
            "confidence": ops.where(found, kept.nmsed_scores, -1.0),
            "labels": ops.where(found, ops.cast(kept.nmsed_classes, "int32"), -1),
            "num_detections": kept.valid_detections,
        }

    def get_config(self):
        return {
            **super().get_config(),
            "bounding_box_format": self.bounding_box_format,
            "from_logits": self.from_logits,
            "iou_threshold": self.iou_threshold,
            "confidence_threshold": self.confidence_threshold,
            "max_detections": self.max_detections,
            "candidates": self.candidates,
        }


@keras.saving.register_keras_serializable(package="bit_keras")
class RetinaNet(RetinaNetObjectDetector):
    """keras-hub's `RetinaNetObjectDetector` on a `BiTRetinaNetBackbone`, with the paper's subnets: float32 RGB images
    in [0, 1] of the backbone's `image_shape` -> `{"bbox_regression": [B, A, 4] box deltas ("center_xywh" of the
    anchors), "cls_logits": [B, A, num_classes]}` (float32) over the A anchors of `anchor_generator`;
    `decode_predictions(outputs, images)` (and `predict`) gives the detections, boxes normalized (ymin, xmin, ymax,
    xmax) by default (`bounding_box_format` "rel_yxyx"), suppressed per class (`PerClassSuppression`).

    keras-hub's arguments, and: `head_channels`, the subnets' width (keras-hub: 256); `class_names`, one per class,
    carried in the config. The class subnet's bias starts at the prior -log((1 - p) / p) of
    `classification_head_prior_probability`, the box subnet's at 0; kernels are normal with stddev 0.01.
    """

    backbone_cls = BiTRetinaNetBackbone

    def __init__(
        self,
        backbone,
        num_classes,
        bounding_box_format="rel_yxyx",
        anchor_generator=None,
        label_encoder=None,
        use_prediction_head_norm=False,
        classification_head_prior_probability=0.01,
        pre_logits_num_conv_layers=4,
        preprocessor=None,
        activation=None,
        dtype=None,
        prediction_decoder=None,
        head_channels=256,
        class_names=None,
        **kwargs,
    ):
        check_options(
            backbone.image_shape[0],
            backbone.fpn_channels,
            head_channels,
            pre_logits_num_conv_layers,
            use_prediction_head_norm,
            num_classes,
            classification_head_prior_probability,
            flags={
                "image_size": "image_shape",
                "head_depth": "pre_logits_num_conv_layers",
                "head_norm": "use_prediction_head_norm",
                "prior_probability": "classification_head_prior_probability",
            },
        )
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes:
                raise ValueError(f"{arg('class_names')}: {len(class_names)} names for {num_classes} classes")
        # keras-hub's RetinaNetObjectDetector.__init__ with the paper's subnets (keras-hub's are 256 wide, initialized
        # with stddev 0.05 and carry the prior on the box subnet) and float32 outputs under mixed precision.
        anchor_generator = anchor_generator or paper_anchor_generator()
        label_encoder = label_encoder or paper_label_encoder()
        head_dtype = dtype or backbone.dtype_policy
        subnet = dict(
            num_filters=head_channels,
            num_conv_layers=pre_logits_num_conv_layers,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            use_group_norm=use_prediction_head_norm,
            dtype=head_dtype,
        )
        box_head = PredictionHead(anchor_generator.num_base_anchors * 4, name="box_head", **subnet)
        classification_head = PredictionHead(
            anchor_generator.num_base_anchors * num_classes,
            use_prior_probability=True,
            prior_probability=classification_head_prior_probability,
            name="classification_head",
            **subnet,
        )
        images = keras.Input(backbone.image_shape, name="images")
        levels = backbone(images)
        boxes, classes = [], []
        for level, feature in levels.items():
            boxes.append(keras.layers.Reshape((-1, 4), name=f"box_pred_{level}", dtype=head_dtype)(box_head(feature)))
            classes.append(
                keras.layers.Reshape((-1, num_classes), name=f"cls_pred_{level}", dtype=head_dtype)(
                    classification_head(feature)
                )
            )
        outputs = {
            "bbox_regression": keras.layers.Concatenate(axis=1, name="bbox_regression", dtype="float32")(boxes),
            "cls_logits": keras.layers.Concatenate(axis=1, name="cls_logits", dtype="float32")(classes),
        }
        super(RetinaNetObjectDetector, self).__init__(inputs=images, outputs=outputs, **kwargs)

        self.bounding_box_format = bounding_box_format
        self.use_prediction_head_norm = use_prediction_head_norm
        self.classification_head_prior_probability = classification_head_prior_probability
        self.num_classes = num_classes
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.activation = activation
        self.pre_logits_num_conv_layers = pre_logits_num_conv_layers
        self.head_channels = head_channels
        self.class_names = class_names
        self.box_head = box_head
        self.classification_head = classification_head
        self.anchor_generator = anchor_generator
        self.label_encoder = label_encoder
        self._prediction_decoder = prediction_decoder or PerClassSuppression(
            bounding_box_format, from_logits=activation != keras.activations.sigmoid
        )

    @property
    def image_size(self) -> int:
        """The side of the (square) input."""
        return self.backbone.image_shape[0]

    @property
    def labels(self) -> list[str]:
        """The class names, or the class ids as text where the model has none."""
        return self.class_names or [str(c) for c in range(self.num_classes)]

    def get_config(self):
        return {
            **super().get_config(),
            "classification_head_prior_probability": self.classification_head_prior_probability,
            "head_channels": self.head_channels,
            "class_names": self.class_names,
        }


def create_detector(
    backbone: str,
    num_classes: int,
    *,
    image_size: int = 512,
    fpn_channels: int = 256,
    head_channels: int = 256,
    head_depth: int = 4,
    head_norm: bool = False,
    prior_probability: float = 0.01,
    class_names: list[str] | None = None,
    dtype: str | None = None,
    pretrained_dir: str | None = None,
    cache_dir: str | None = None,
) -> RetinaNet:
    """A `RetinaNet` of `num_classes` (named `class_names`) on the BiT `backbone` names: a zoo checkpoint (its
    pretrained weights), an official-layout `.npz` (path or URL), an architecture such as "R50x1" (random
    initialization) or a `.keras` BiT (anything `bit_keras.models.resolve.resolve_model` takes), for `image_size` x
    `image_size` inputs (a multiple of 128) and with a preprocessor resizing raw images (uint8) to them. The pyramid
    has `fpn_channels` (the paper: 256), the subnets `head_depth` (4) 3x3 convolutions of `head_channels` (256),
    followed by group norm with `head_norm` (for small per-device batches); the class subnet starts at the
    foreground probability `prior_probability` (0.01). `dtype` is a dtype policy name; the outputs are float32."""
    from bit_keras.models.resolve import resolve_model

    # Checked before the backbone is resolved (a download), naming these arguments.
    check_options(image_size, fpn_channels, head_channels, head_depth, head_norm, num_classes, prior_probability)
    bit = resolve_model(backbone, num_classes=0, dtype=dtype, pretrained_dir=pretrained_dir, cache_dir=cache_dir)
    shape = (image_size, image_size, 3)
    converter = RetinaNetImageConverter(image_size=shape[:2], scale=1 / 255, crop_to_aspect_ratio=False)
    return RetinaNet(
        BiTRetinaNetBackbone(bit.model.backbone, fpn_channels=fpn_channels, image_shape=shape, dtype=dtype),
        num_classes,
        use_prediction_head_norm=head_norm,
        classification_head_prior_probability=prior_probability,
        pre_logits_num_conv_layers=head_depth,
        preprocessor=RetinaNetObjectDetectorPreprocessor(converter),
        dtype=dtype,
        head_channels=head_channels,
        class_names=class_names,
    )


def load_detector(path: str, argument: str = "model") -> RetinaNet:
    """The `RetinaNet` of a finished `finetune-detector` run folder (a keras-hub preset directory: `from_preset`) or
    of its `.keras` file, with its class names and input size; a one-line error naming `path` (given as `argument`)
    otherwise."""
    from bit_keras.models.resolve import PRESET_FILE, _first_reason, load_keras

    path, what = str(path), f"{arg(argument)}: a finetune-detector run folder or its model.keras"
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, PRESET_FILE)):
            raise FileNotFoundError(f"{path} holds no {PRESET_FILE}: not a finished run ({what})")
        try:
            return RetinaNet.from_preset(path)
        except (ValueError, OSError, TypeError, KeyError) as err:
            raise ValueError(f"{path}: not a bit_keras detector ({_first_reason(err)})") from None
    if not path.endswith(".keras") or not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist ({what})")
    return load_keras(path, RetinaNet)
