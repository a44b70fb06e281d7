"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") on a BiT backbone: the paper's detection
transfer.

The backbone's block outputs C3-C5 (strides 8, 16, 32) feed a feature pyramid P3-P7 (P6 from C5, P7 from
relu(P6)); a class subnet and a box subnet, each `head_depth` 3x3 convolutions shared across levels, predict
for 9 anchors per location (3 scales x 3 aspect ratios, 4 x stride). keras-hub 0.32 supplies the pyramid, the
anchors, the IoU matching, the heads and non-max suppression; this module wires them to a BiT and adds what
keras-hub's `RetinaNetObjectDetector` lacks: configurable pyramid and head widths, the 0.01 prior on the class
(not the box) head and per-class non-max suppression. The loss is `bit_keras.detection.objective.FocalLoss`.
"""

import keras
from keras import ops

# keras-hub exports only the assembled RetinaNet (fixed 256-channel pyramid and heads); its parts live in these
# modules, pinned by the keras-hub 0.32.x requirement.
from keras_hub.layers import AnchorGenerator, NonMaxSuppression
from keras_hub.src.models.retinanet.feature_pyramid import FeaturePyramid
from keras_hub.src.models.retinanet.prediction_head import PredictionHead
from keras_hub.src.models.retinanet.retinanet_label_encoder import RetinaNetLabelEncoder

from bit_keras.models.bit import BiT

MIN_LEVEL, MAX_LEVEL = 3, 7  # pyramid levels P3-P7 (strides 8-128)
NUM_SCALES, ASPECT_RATIOS, ANCHOR_SIZE = 3, (0.5, 1.0, 2.0), 4  # anchors 4 x stride x 2^(k/3), k = 0, 1, 2
POSITIVE_IOU, NEGATIVE_IOU = 0.5, 0.4  # anchors matched at IoU >= 0.5, background below 0.4, ignored between
BOX_ENCODING = "center_yxhw"  # box targets: center offsets / anchor size and log size ratios
BACKGROUND, IGNORED = -1, -2  # class targets of unmatched and ignored anchors
SCORE_THRESHOLD, MAX_DETECTIONS = 0.05, 100  # decoding's defaults: COCO's evaluation settings


def anchor_generator() -> AnchorGenerator:
    """keras-hub's anchor generator with the paper's anchors, boxes (ymin, xmin, ymax, xmax) in pixels."""
    return AnchorGenerator(
        "yxyx",
        min_level=MIN_LEVEL,
        max_level=MAX_LEVEL,
        num_scales=NUM_SCALES,
        aspect_ratios=list(ASPECT_RATIOS),
        anchor_size=ANCHOR_SIZE,
    )


def anchors(image_size: int):
    """The anchors of a `image_size` x `image_size` input, [A, 4] in pixels, levels P3..P7 in order."""
    return ops.concatenate(list(anchor_generator()(ops.zeros((image_size, image_size, 3))).values()), axis=0)


def label_encoder() -> RetinaNetLabelEncoder:
    """keras-hub's encoder of training targets: each anchor matched by IoU to a ground-truth box (pixels, yxyx)
    gets its class and box deltas (`BOX_ENCODING`), or the `BACKGROUND` or `IGNORED` class."""
    return RetinaNetLabelEncoder(
        anchor_generator(),
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
    """One-line errors for detector settings a `RetinaNet` cannot have (`flags` renames them, e.g. for the CLI)."""
    flags = flags or {}
    sizes = {"num_classes": num_classes, "image_size": image_size, "fpn_channels": fpn_channels}
    sizes |= {"head_channels": head_channels, "head_depth": head_depth}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flags.get(name, name)} must be a positive integer, got {value!r}")
    if image_size % 2**MAX_LEVEL:
        name = flags.get("image_size", "image_size")
        raise ValueError(f"{name} must be a multiple of {2**MAX_LEVEL} (the coarsest stride), got {image_size}")
    if head_norm and head_channels % 32:
        raise ValueError(f"head_norm uses 32 groups: head_channels must be a multiple of 32, got {head_channels}")
    number = isinstance(prior_probability, int | float) and not isinstance(prior_probability, bool)
    if not (number and 0 < prior_probability < 1):
        raise ValueError(f"prior_probability must be a number in (0, 1), got {prior_probability!r}")


@keras.saving.register_keras_serializable(package="bit_keras")
class RetinaNet(keras.Model):
    """RetinaNet on a `BiT` backbone: float32 RGB images in [0, 1] of `image_size` x `image_size` ->
    `{"boxes": [B, A, 4] box deltas, "classes": [B, A, num_classes] logits}` over the A anchors of `anchors()`.

    Args:
        backbone: a `BiT` (its final norm and head are not used); its weights are the detector's backbone weights.
        num_classes: object classes (no background class: the class subnet is a sigmoid per class).
        image_size: the (square) input side; anchors are laid out for it.
        fpn_channels, head_channels: widths of the pyramid and of the subnets (the paper: 256 each).
        head_depth: 3x3 convolutions in each subnet before its prediction layer (the paper: 4).
        head_norm: group normalization after each subnet convolution (for small per-device batches).
        prior_probability: the class subnet's initial foreground probability (the paper: 0.01).
        dtype: a dtype policy name for the pyramid and heads (the backbone has its own); outputs are float32.
    """

    def __init__(
        self,
        backbone: BiT,
        num_classes: int,
        image_size: int = 512,
        fpn_channels: int = 256,
        head_channels: int = 256,
        head_depth: int = 4,
        head_norm: bool = False,
        prior_probability: float = 0.01,
        dtype: str | None = None,
        **kwargs,
    ):
        check_options(
            num_classes=num_classes,
            image_size=image_size,
            fpn_channels=fpn_channels,
            head_channels=head_channels,
            head_depth=head_depth,
            head_norm=head_norm,
            prior_probability=prior_probability,
        )
        num_anchors = NUM_SCALES * len(ASPECT_RATIOS)
        images = keras.Input((image_size, image_size, 3), name="images")
        levels = {f"P{level}": backbone.pyramid_outputs[f"P{level}"] for level in range(MIN_LEVEL, 6)}
        features = keras.Model(backbone.input, levels, name="backbone")(images)
        pyramid = FeaturePyramid(MIN_LEVEL, MAX_LEVEL, use_p5=True, num_filters=fpn_channels, dtype=dtype, name="fpn")(
            features
        )
        subnet = dict(
            num_filters=head_channels,
            num_conv_layers=head_depth,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),  # the paper's initialization
            use_group_norm=head_norm,
            dtype=dtype,
        )
        box_head = PredictionHead(num_anchors * 4, name="box_head", **subnet)
        class_head = PredictionHead(
            num_anchors * num_classes,
            use_prior_probability=True,  # bias -log((1 - p) / p): every anchor starts as background with p
            prior_probability=prior_probability,
            name="class_head",
            **subnet,
        )
        boxes, classes = [], []
        for level, feature in pyramid.items():
            boxes.append(keras.layers.Reshape((-1, 4), name=f"boxes_{level}", dtype=dtype)(box_head(feature)))
            classes.append(
                keras.layers.Reshape((-1, num_classes), name=f"classes_{level}", dtype=dtype)(class_head(feature))
            )
        outputs = {
            "boxes": keras.layers.Concatenate(axis=1, name="boxes", dtype="float32")(boxes),
            "classes": keras.layers.Concatenate(axis=1, name="classes", dtype="float32")(classes),
        }
        super().__init__(inputs=images, outputs=outputs, **kwargs)

        self.backbone = self.get_layer("backbone")  # the BiT's layers up to C5 (not its unused final norm)
        self.backbone_config = keras.saving.serialize_keras_object(backbone)
        self.num_classes = num_classes
        self.image_size = image_size
        self.fpn_channels = fpn_channels
        self.head_channels = head_channels
        self.head_depth = head_depth
        self.head_norm = head_norm
        self.prior_probability = prior_probability
        self.policy = keras.dtype_policies.get(dtype).name if dtype is not None else None

    def anchors(self):
        """The anchors, [A, 4] (ymin, xmin, ymax, xmax) in pixels, levels P3..P7 in order (as the outputs)."""
        return anchors(self.image_size)

    def decode(
        self,
        outputs,
        score_threshold=SCORE_THRESHOLD,
        iou_threshold=0.5,
        max_detections=MAX_DETECTIONS,
        candidates=1000,
    ):
        """Detections from raw outputs: `{"boxes": [B, max_detections, 4] normalized (ymin, xmin, ymax, xmax),
        "scores", "classes", "num_detections" [B]}`, padded with score 0 and class -1.

        The `candidates` best (anchor, class) scores above `score_threshold` go through per-class non-max
        suppression at `iou_threshold`, as in the paper (keras-hub's suppression is class-agnostic: each class's
        boxes are shifted apart so that boxes of different classes never overlap).
        """
        size = float(self.image_size)
        boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            self.anchors(), outputs["boxes"], "yxyx", "yxyx", encoded_format=BOX_ENCODING
        )
        scores = ops.sigmoid(outputs["classes"])
        num_classes = self.num_classes
        flat = ops.reshape(scores, (-1, boxes.shape[1] * num_classes))
        top_scores, top = ops.top_k(flat, min(candidates, boxes.shape[1] * num_classes))
        anchor, label = top // num_classes, top % num_classes
        top_boxes = ops.clip(ops.take_along_axis(boxes, anchor[..., None], axis=1), 0.0, size)
        shift = ops.cast(label, "float32")[..., None] * (size + 1.0)
        one_class = ops.one_hot(label, num_classes) * top_scores[..., None]  # suppression's score and class
        suppress = NonMaxSuppression(
            "yxyx",
            from_logits=False,
            iou_threshold=iou_threshold,
            confidence_threshold=score_threshold,
            max_detections=max_detections,
        )
        kept = suppress(top_boxes + shift, one_class)
        found = ops.arange(max_detections)[None, :] < ops.cast(kept["num_detections"], "int32")[:, None]
        classes = ops.where(found, ops.cast(kept["labels"], "int32"), -1)
        unshift = ops.cast(ops.maximum(classes, 0), "float32")[..., None] * (size + 1.0)
        return {
            "boxes": ops.where(found[..., None], (kept["boxes"] - unshift) / size, 0.0),
            "scores": ops.where(found, kept["confidence"], 0.0),
            "classes": classes,
            "num_detections": ops.cast(kept["num_detections"], "int32"),
        }

    def get_config(self):
        return {
            "backbone": self.backbone_config,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "fpn_channels": self.fpn_channels,
            "head_channels": self.head_channels,
            "head_depth": self.head_depth,
            "head_norm": self.head_norm,
            "prior_probability": self.prior_probability,
            "dtype": self.policy,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "backbone": keras.saving.deserialize_keras_object(config["backbone"])})


def create_detector(
    backbone: str,
    num_classes: int,
    *,
    dtype: str | None = None,
    pretrained_dir: str | None = None,
    cache_dir: str | None = None,
    **options,
) -> RetinaNet:
    """A `RetinaNet` of `num_classes` on the BiT `backbone` names: a zoo checkpoint (its pretrained weights), an
    official-layout `.npz` (path or URL), an architecture such as "R50x1" (random initialization) or a `.keras`
    BiT (anything `bit_keras.models.resolve.resolve_model` takes); `options` are `RetinaNet`'s (image_size,
    fpn_channels, head_channels, head_depth, head_norm, prior_probability); the rest is initialized as in the
    paper."""
    from bit_keras.models.resolve import resolve_model

    bit = resolve_model(backbone, num_classes=0, dtype=dtype, pretrained_dir=pretrained_dir, cache_dir=cache_dir)
    return RetinaNet(bit.model, num_classes, dtype=dtype, **options)
