"""The BiT model zoo: the presets by name, the architectures, and `create_model`.

The presets' records, labels and weights are `bit_keras.models.presets`'; the architecture arithmetic is
`bit_keras.models.architecture`'s. Both are re-exported here under their earlier names."""

import difflib
import os
import re
from typing import TYPE_CHECKING

from bit_keras.checks import arg
from bit_keras.models.architecture import ARCH_PATTERN, ARCHITECTURES, BLOCK_UNITS, channels, parameter_count
from bit_keras.models.architecture import parse_architecture as _parse
from bit_keras.models.presets import (
    BUCKET,
    LABEL_SOURCES,
    LABELS_DEADLINE_S,
    MAX_LABELS_BYTES,
    PACKAGE_DIR,
    WEIGHTS_DIR,
    Checkpoint,
    Preset,
    label_names,
    read_labels,
    read_weights,
)
from bit_keras.models.presets import PRESETS as CHECKPOINTS

if TYPE_CHECKING:
    from bit_keras.models.classifier import BiTImageClassifier

__all__ = [  # the names earlier versions of this module defined
    "ARCHITECTURES",
    "ARCH_PATTERN",
    "BLOCK_UNITS",
    "BUCKET",
    "CHECKPOINTS",
    "LABELS_DEADLINE_S",
    "LABEL_SOURCES",
    "MAX_LABELS_BYTES",
    "PACKAGE_DIR",
    "WEIGHTS_DIR",
    "Checkpoint",
    "Preset",
    "architecture_name",
    "channels",
    "create_model",
    "label_names",
    "list_models",
    "parameter_count",
    "parse_architecture",
    "read_labels",
]


def architecture_name(spec: str) -> str:
    """The architecture ("R14x0.5") of a zoo checkpoint name or an official-layout `.npz` file."""
    from bit_keras.models import checkpoint
    from bit_keras.models.architecture import architecture_name as name_of

    if spec in CHECKPOINTS:
        return CHECKPOINTS[spec].arch
    return name_of(*checkpoint.architecture_of(checkpoint.read_npz(spec), spec))


def parse_architecture(arch: str) -> tuple[tuple[int, ...], int | float]:
    """`"R50x1"` -> `((3, 4, 6, 3), 1)`; widths may be fractional (`"R26x0.5"`); anything else is a ValueError
    suggesting the closest names."""
    try:
        return _parse(arch)
    except ValueError:
        close = _closest(arch, list_models())
        hint = (
            f"did you mean {', '.join(map(repr, close))}?"
            if close
            else f"expected a checkpoint name ({', '.join(list(CHECKPOINTS)[:3])}, ...) "
            f"or an architecture R{{{'|'.join(map(str, BLOCK_UNITS))}}}x<width>;"
        )
        raise ValueError(f"unknown model {arch!r}: {hint} see `bit-keras models`") from None


def _closest(name, names):
    """The one of `names` equal to `name` ignoring case, else up to three closest to it."""
    by_lower = {n.lower(): n for n in names}
    if name.lower() in by_lower:
        return [by_lower[name.lower()]]
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, n=3)]


def list_models(pretrained_only: bool = False) -> list[str]:
    """Every name `create_model` accepts: released checkpoints, then bare architectures."""
    return list(CHECKPOINTS) + ([] if pretrained_only else list(ARCHITECTURES))


def _is_checkpoint_file(name):
    return name.endswith(".npz") or "://" in name


def create_model(
    name_or_arch: str,
    weights: str | None = None,
    num_classes: int | None = None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    **kwargs,
) -> "BiTImageClassifier":
    """Build a BiT classifier (a `BiTImageClassifier`: images in [0, 1] -> logits), optionally loading official
    weights. keras-hub's way, `BiTImageClassifier.from_preset(name)`, also gives the preset's class names and a
    preprocessor for raw images; this one leaves both out (`predict` takes images in [0, 1], as the model).

    Args:
        name_or_arch: a checkpoint name (`"BiT-M-R50x1"`), an architecture (`"R50x1"`, `"R26x0.5"`), or
            an official-layout `.npz` path or URL (architecture read from the file, weights loaded).
        weights: None (random init), `"pretrained"` (the registry URL), a local `.npz` path, or an
            http(s):// or gs:// URL (downloaded once into the cache).
        num_classes: None keeps the checkpoint's head; an int different from it gives a new
            zero-initialized head; 0 gives pooled pre-logit features.
        cache_dir: download cache (default `$BIT_KERAS_CACHE` or `~/.keras/bit_keras`).
        **kwargs: `normalization`, `weight_standardization`, `groups`, `dtype`, `input_shape` and `data_format` of
            the `BiTBackbone`; `name` of the classifier.
    """
    from bit_keras.models import checkpoint  # Keras and TensorFlow: not for `bit-keras models`
    from bit_keras.models.backbone import BiTBackbone
    from bit_keras.models.classifier import BiTImageClassifier

    name_or_arch = str(name_or_arch)
    entry = CHECKPOINTS.get(name_or_arch)
    from_file = entry is None and _is_checkpoint_file(name_or_arch)
    if from_file:
        if weights is not None:
            raise ValueError(f"{name_or_arch!r} is a checkpoint file already: leave {arg('weights')} out")
        weights = name_or_arch
    elif weights == "pretrained":
        if entry is None:
            arch = parse_architecture(name_or_arch)  # an unknown name: the closest ones suggested
            names = [e.name for e in CHECKPOINTS.values() if parse_architecture(e.arch) == arch]
            need = (
                f"one of its checkpoints {', '.join(names)}" if names else "a checkpoint name (none is released for it)"
            )
            raise ValueError(
                f"{name_or_arch!r} is an architecture: {arg('weights', repr('pretrained'))} needs {need}; "
                "see `bit-keras models`"
            )
        weights = entry.url
    arrays = None
    if weights is not None:
        source = str(weights)
        arrays = read_weights(source, cache_dir, progress)
        file_classes = checkpoint.head_classes(arrays)
    else:
        file_classes = entry.num_classes if entry else None
    if from_file:
        block_units, width = checkpoint.architecture_of(arrays, source)
        if block_units not in BLOCK_UNITS.values():  # a file missing whole units must not load as another depth
            raise checkpoint.CheckpointError(
                f"{source}: units per block {block_units} match no BiT depth {sorted(BLOCK_UNITS)}; "
                f"keys are missing, or pass the architecture name and {arg('weights', 'PATH')}"
            )
    elif entry:
        block_units, width = entry.block_units, entry.width
    else:
        block_units, width = parse_architecture(name_or_arch)
    if num_classes is None:
        if file_classes is None:
            raise ValueError(f"{name_or_arch!r} has no checkpoint head: pass {arg('num_classes')} (0 for features)")
        num_classes = file_classes
    default_name = os.path.basename(name_or_arch).removesuffix(".npz") if from_file else name_or_arch
    name = kwargs.pop("name", re.sub(r"[^0-9A-Za-z_]", "_", default_name).lower())
    if "input_shape" in kwargs:
        kwargs["image_shape"] = kwargs.pop("input_shape")
    model = BiTImageClassifier(BiTBackbone(block_units, width, **kwargs), num_classes, name=name)
    if arrays is not None:
        checkpoint.load_checkpoint(model, arrays, skip_head=num_classes != file_classes, source=source)
    return model
