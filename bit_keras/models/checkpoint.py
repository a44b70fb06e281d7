"""Official BiT `.npz` checkpoints: an explicit name-keyed mapping, strict loading and saving.

Every key of the file must be consumed and every weight of the model set; anything else is a
`CheckpointError` naming the key (and both shapes), raised before a single weight is assigned.
"""

import math
import os
import re
import zipfile
import zlib

import keras
import numpy as np

from bit_keras import files
from bit_keras.models.layers import GroupNorm, StandardizedConv2D

PREFIX = "resnet/"
HEAD_KEYS = (PREFIX + "head/conv2d/kernel", PREFIX + "head/conv2d/bias")
MAX_NPZ_BYTES = 8 << 30  # uncompressed; the biggest BiT checkpoint (R152x4, ~936M float32 weights) is ~3.8 GB
# Float weights hardly compress (official files are stored, np.savez_compressed of random floats gets ~1.1x), while
# deflate inflates zeros up to ~1000x: a larger member compressed more than this is a zip bomb, not weights.
MAX_COMPRESSION_RATIO = 100
RATIO_MIN_BYTES = 4 << 20
CHUNK_BYTES = 16 << 20  # arrays are read in pieces of this size


class CheckpointError(ValueError):
    """A checkpoint file that does not fit the model (or is no checkpoint at all)."""


def _norm_entries(layer, prefix):
    kind = "group_norm" if isinstance(layer, GroupNorm) else "batch_norm"
    entries = [(f"{prefix}{kind}/gamma", layer.gamma), (f"{prefix}{kind}/beta", layer.beta)]
    if kind == "batch_norm":
        entries += [(f"{prefix}{kind}/moving_mean", layer.moving_mean)]
        entries += [(f"{prefix}{kind}/moving_variance", layer.moving_variance)]
    return entries


def _conv_entry(layer, prefix):
    kind = "standardized_conv2d" if isinstance(layer, StandardizedConv2D) else "conv2d"
    return (f"{prefix}{kind}/kernel", layer.kernel)


def layout(model):
    """`[(key, variable, shape_in_file)]` for every weight of a BiT model (a `BiTImageClassifier`, a
    `BiTBackbone`, or the earlier `BiT`), in the official key names.

    Group norm and weight-standardized convolutions give exactly the official keys; the ablation
    variants use `batch_norm/{gamma,beta,moving_mean,moving_variance}` and `conv2d/kernel` instead.
    """
    body = getattr(model, "backbone", model)  # a classifier's backbone, or the model itself
    head = _head(model)
    entries = [_conv_entry(body.get_layer("root_conv"), PREFIX + "root_block/")]
    for b, units in enumerate(body.block_units, start=1):
        for u in range(1, units + 1):
            unit = body.get_layer(f"block{b}_unit{u:02d}")
            prefix = f"{PREFIX}block{b}/unit{u:02d}/"
            for part in "abc":
                entries += _norm_entries(getattr(unit, f"norm_{part}"), f"{prefix}{part}/")
                entries.append(_conv_entry(getattr(unit, f"conv_{part}"), f"{prefix}{part}/"))
            if unit.proj is not None:
                entries.append(_conv_entry(unit.proj, f"{prefix}a/proj/"))
    entries += _norm_entries(body.get_layer("pre_head_norm"), PREFIX)
    result = [(key, var, tuple(var.shape)) for key, var in entries]
    if head is not None:
        result.append((HEAD_KEYS[0], head.kernel, (1, 1, *head.kernel.shape)))  # official head: 1x1 conv
        result.append((HEAD_KEYS[1], head.bias, tuple(head.bias.shape)))
    covered = {id(var) for _, var, _ in result}
    missing = [w.path for w in model.weights if id(w) not in covered]
    if missing:
        raise CheckpointError(f"model weights without a checkpoint key: {missing[:5]}")
    return result


def _head(model):
    """The dense head of a BiT model, or None (a backbone, a model of pooled features)."""
    if not getattr(model, "num_classes", 0):
        return None
    return getattr(model, "output_dense", None) or model.get_layer("head")  # `BiTImageClassifier`'s, or `BiT`'s


def read_npz(path):
    """All arrays of an `.npz` file as a dict; a one-line `CheckpointError` naming the file (and member) for anything
    that is not one. The zip directory and every `.npy` header are checked before data is read (`check_npz`), so a
    zip bomb or a header declaring terabytes is refused before anything is inflated or allocated."""
    return _read_npz(path, read_data=True)


def check_npz(path):
    """A `CheckpointError` unless `path` passes the checks of `read_npz`; reads only the zip directory and headers."""
    _read_npz(path, read_data=False)


def _read_npz(path, read_data):
    try:
        f = files.open_regular(path, "a .npz checkpoint")  # a FIFO or device would block the read, or never end
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    arrays = {}
    with f:
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            what = "not a readable .npz checkpoint (truncated or not an npz"
            raise CheckpointError(f"{path}: {what}: {_first(err)})") from None
        with archive:
            check_member_sizes(archive, path)
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        key, dtype, shape, fortran = _member_header(member, info, path)
                        if read_data:
                            arrays[key] = _member_array(member, dtype, shape, fortran)
                except CheckpointError:
                    raise
                except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, RuntimeError) as err:
                    raise CheckpointError(f"{path}: member {info.filename!r} is unreadable ({_first(err)})") from None
    return arrays


def _first(err):
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _member_header(member, info, path):
    """`(key, dtype, shape, fortran_order)` of an `.npy` member, its header checked against the member's size."""
    where = f"{path}: member {info.filename!r}"
    if not info.filename.endswith(".npy"):
        raise CheckpointError(f"{where} is not an .npy array: not a checkpoint")
    version = np.lib.format.read_magic(member)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise CheckpointError(f"{where} is a version {version[0]}.{version[1]} .npy file, not one of numeric weights")
    shape, fortran, dtype = read_header[version](member)
    if not np.issubdtype(dtype, np.number):  # object (pickled), strings, structured, bool, dates: not weights
        raise CheckpointError(f"{where} has dtype {dtype}: not numeric weights")
    declared, held = math.prod(shape) * dtype.itemsize, info.file_size - member.tell()
    if declared != held:
        raise CheckpointError(
            f"{where} declares shape {shape} {dtype} ({declared:,} bytes) but holds {held:,} bytes of data"
        )
    return info.filename.removesuffix(".npy"), dtype, shape, fortran


def _member_array(member, dtype, shape, fortran):
    """The array whose data follows the header in `member`, read in chunks into a writable array."""
    array = np.empty(shape[::-1] if fortran else shape, dtype)
    view, done = memoryview(array.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        read = member.readinto(view[done : done + CHUNK_BYTES])
        if not read:
            raise EOFError(f"the data ends after {done:,} of {len(view):,} bytes")
        done += read
    return array.T if fortran else array


def check_member_sizes(archive, path):
    """A CheckpointError naming the member unless the declared sizes of `archive`'s members are plausible weights:
    at most `MAX_NPZ_BYTES` in all, and members above `RATIO_MIN_BYTES` compressed at most `MAX_COMPRESSION_RATIO`."""
    total = 0
    for info in archive.infolist():
        total += info.file_size
        if total > MAX_NPZ_BYTES:
            raise CheckpointError(
                f"{path}: member {info.filename!r} takes the uncompressed size past {MAX_NPZ_BYTES / 2**30:g} GiB, "
                "more than any BiT checkpoint"
            )
        if info.file_size > RATIO_MIN_BYTES and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
            raise CheckpointError(
                f"{path}: member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size}, "
                f"more than the {MAX_COMPRESSION_RATIO}x float weights can reach: a zip bomb, not a checkpoint"
            )


def architecture_of(arrays, source="checkpoint"):
    """`(block_units, width)` of an official-layout checkpoint, read from its keys and root kernel."""
    root = arrays.get(PREFIX + "root_block/standardized_conv2d/kernel")
    if root is None or root.ndim != 4:
        raise CheckpointError(f"{source}: no {PREFIX}root_block/standardized_conv2d/kernel: not a BiT checkpoint")
    units = {}
    for key in arrays:
        match = re.match(rf"{PREFIX}block(\d+)/unit(\d+)/", key)
        if match:
            block, unit = int(match.group(1)), int(match.group(2))
            units[block] = max(units.get(block, 0), unit)
    if sorted(units) != list(range(1, len(units) + 1)) or not units:
        raise CheckpointError(f"{source}: blocks {sorted(units)} are not numbered 1..n")
    width = root.shape[-1] / 64
    return tuple(units[b] for b in sorted(units)), int(width) if width.is_integer() else width


def head_classes(arrays):
    """The class count of a checkpoint's head (from its kernel, else its bias), or 0 when it has none.

    Reading either key means a file missing the other one fails on that key, not as an unexpected one.
    """
    for key in HEAD_KEYS:
        if key in arrays:
            return int(arrays[key].shape[-1])
    return 0


def load_checkpoint(
    model: keras.Model,
    path_or_arrays: str | os.PathLike | dict[str, np.ndarray],
    skip_head: bool = False,
    source: str | None = None,
) -> keras.Model:
    """Set every weight of `model` from an official-layout checkpoint (a path or a dict of arrays).

    With `skip_head`, the file's head keys are ignored and the model's head keeps its values (a new,
    zero-initialized head). Nothing is assigned unless the whole file matches; errors name `source`.
    """
    if isinstance(path_or_arrays, str | os.PathLike):
        source = source or os.fspath(path_or_arrays)
        arrays = read_npz(path_or_arrays)
    else:
        source = source or "checkpoint"
        arrays = dict(path_or_arrays)
    entries = layout(model)
    if skip_head:
        entries = [e for e in entries if e[0] not in HEAD_KEYS]
        arrays = {k: v for k, v in arrays.items() if k not in HEAD_KEYS}
    expected = {key for key, _, _ in entries}
    missing = [key for key, _, _ in entries if key not in arrays]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more} for {model.name}")
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}{more} for {model.name}")
    values = []
    for key, var, shape in entries:
        array = arrays[key]
        if tuple(array.shape) != shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(array.shape)}, the model expects {shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{source}: key {key!r} has dtype {array.dtype}, expected floating point")
        values.append((var, array.reshape(var.shape)))
    for var, value in values:
        var.assign(value.astype(var.dtype))
    return model


def save_checkpoint(model: keras.Model, path: str | os.PathLike) -> str:
    """Write `model`'s weights as an official-layout `.npz` (float32), atomically (temp file + rename)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: checkpoint path must end with .npz")
    arrays = {key: np.asarray(var.numpy(), np.float32).reshape(shape) for key, var, shape in layout(model)}
    with files.replacing(path) as tmp, open(tmp, "xb") as f:
        np.savez(f, **arrays)
    return path
