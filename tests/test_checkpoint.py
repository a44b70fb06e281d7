"""The official .npz layout: exact key mapping, strict loading (no half-loaded model), saving."""

import io
import os
import pathlib
import tracemalloc
import zipfile

import numpy as np
import pytest

import bit_keras
from bit_keras.models import checkpoint
from bit_keras.models.bit import BiT
from bit_keras.models.checkpoint import CheckpointError, layout, load_checkpoint, read_npz, save_checkpoint
from tests.official_npz import official_shapes, random_checkpoint, write_npz

SMALL_UNITS = (2, 2, 2, 2)


@pytest.fixture
def small_model():
    return BiT(SMALL_UNITS, 0.5, num_classes=10)


def snapshot(model):
    return [np.array(w) for w in model.weights]


@pytest.mark.parametrize(
    "units,width,count",
    [((3, 4, 6, 3), 1, 153), (SMALL_UNITS, 0.5, None)],
    ids=["R50x1", "R26x0.5"],
)
def test_layout_is_the_official_key_set(units, width, count):
    model = BiT(units, width, num_classes=1000)
    entries = layout(model)
    shapes = {key: shape for key, _, shape in entries}
    assert shapes == official_shapes(units, width, 1000)
    assert len(entries) == len(model.weights)  # every model weight has exactly one key
    if count:
        assert len(entries) == count


@pytest.mark.slow
@pytest.mark.parametrize("units,count", [((3, 4, 23, 3), 306), ((3, 8, 36, 3), 459)], ids=["R101", "R152"])
def test_layout_key_counts_deep(units, count):
    model = BiT(units, 1, num_classes=1000)
    assert {k: s for k, _, s in layout(model)} == official_shapes(units, 1, 1000)
    assert len(layout(model)) == count


def test_save_load_round_trip_is_exact(small_model, small_params, tmp_path):
    load_checkpoint(small_model, small_params)
    path = tmp_path / "out" / "small.npz"
    assert save_checkpoint(small_model, path) == str(path)
    assert os.listdir(path.parent) == ["small.npz"]  # written through a temp file, nothing left beside it
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # a normal file's mode, not the 0600 of mkstemp
    saved = read_npz(str(path))
    assert saved.keys() == small_params.keys()
    for key, value in small_params.items():
        assert saved[key].dtype == np.float32
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    with pytest.raises(ValueError, match="must end with .npz"):
        save_checkpoint(small_model, tmp_path / "x.bin")


@pytest.mark.parametrize("normalization,ws", [("batch", True), ("group", False)])
def test_ablation_variants_round_trip(normalization, ws, tmp_path):
    model = BiT(SMALL_UNITS, 0.5, num_classes=4, normalization=normalization, weight_standardization=ws)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype(np.float32))
    path = save_checkpoint(model, tmp_path / "ablation.npz")
    keys = read_npz(path).keys()
    if normalization == "batch":
        assert "resnet/block1/unit01/a/batch_norm/moving_variance" in keys
    if not ws:
        assert "resnet/root_block/conv2d/kernel" in keys
    clone = BiT(SMALL_UNITS, 0.5, num_classes=4, normalization=normalization, weight_standardization=ws)
    load_checkpoint(clone, path)
    for a, b in zip(model.weights, clone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _drop(params, key):
    return {k: v for k, v in params.items() if k != key}


BAD = {
    "missing key": (
        lambda p: _drop(p, "resnet/block2/unit02/b/group_norm/gamma"),
        "missing key 'resnet/block2/unit02/b/group_norm/gamma'",
    ),
    "extra key": (
        lambda p: {**p, "resnet/block5/unit01/a/group_norm/gamma": np.ones(3, np.float32)},
        "unexpected key 'resnet/block5/unit01/a/group_norm/gamma'",
    ),
    "wrong shape": (
        lambda p: {**p, "resnet/block3/unit01/a/group_norm/gamma": np.ones(64, np.float32)},
        r"key 'resnet/block3/unit01/a/group_norm/gamma' has shape \(64,\), the model expects \(256,\)",
    ),
    "wrong dtype": (
        lambda p: {**p, "resnet/group_norm/beta": np.ones(1024, np.int32)},
        "key 'resnet/group_norm/beta' has dtype int32",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_refused_and_model_untouched(case, small_model, small_params, tmp_path):
    corrupt, message = BAD[case]
    path = tmp_path / "bad.npz"
    write_npz(path, corrupt(small_params))
    before = snapshot(small_model)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(small_model, str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    for a, b in zip(before, snapshot(small_model)):
        np.testing.assert_array_equal(a, b)  # nothing was assigned
    with pytest.raises(CheckpointError, match=message):
        bit_keras.create_model("R26x0.5", weights=str(path))


@pytest.mark.parametrize("content", ["truncated", "text"])
def test_unreadable_files_give_one_line_errors(content, small_npz, tmp_path):
    path = tmp_path / "broken.npz"
    data = pathlib.Path(small_npz).read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncated" else b"not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable .npz checkpoint") as info:
        bit_keras.create_model("R26x0.5", weights=str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert path.exists()  # a user's file, not the download cache's: kept


def test_truncated_member_data_is_detected(small_params, tmp_path):
    """A zip whose directory survives but whose data is cut (a partial copy) is still refused."""
    good = tmp_path / "good.npz"
    write_npz(good, small_params)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 2] if info.filename.endswith("gamma.npy") else data)
    with pytest.raises(CheckpointError):
        bit_keras.create_model("R26x0.5", weights=str(bad))


def test_wrong_architecture_names_key_and_shapes(small_npz):
    with pytest.raises(CheckpointError, match=r"root_block/standardized_conv2d/kernel' has shape \(7, 7, 3, 32\)"):
        bit_keras.create_model("R26x1", weights=small_npz)


def test_random_checkpoint_helper_is_official_layout():
    params = random_checkpoint()
    assert len(params) == 153 and all(key.startswith("resnet/") for key in params)


def test_file_missing_a_whole_unit_is_not_another_depth(small_params, tmp_path):
    params = {k: v for k, v in small_params.items() if "block4/unit02/" not in k}
    write_npz(tmp_path / "cut.npz", params)
    with pytest.raises(CheckpointError, match=r"units per block \(2, 2, 2, 1\) match no BiT depth"):
        bit_keras.create_model(str(tmp_path / "cut.npz"))


def test_head_class_count_read_from_kernel_when_bias_missing(small_params, tmp_path):
    params = {k: v for k, v in small_params.items() if k != "resnet/head/conv2d/bias"}
    write_npz(tmp_path / "no_bias.npz", params)
    with pytest.raises(CheckpointError, match="missing key 'resnet/head/conv2d/bias'"):
        bit_keras.create_model(str(tmp_path / "no_bias.npz"))


def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A 256 MiB float32 array of zeros deflates to ~0.25 MB: refused from the zip directory, nothing inflated."""
    path = tmp_path / "bomb.npz"
    count = 64 << 20
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("resnet/head/conv2d/kernel.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (count,)})
        zeros = bytes(1 << 20)
        for _ in range(4 * count // len(zeros)):
            member.write(zeros)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            read_npz(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    message = str(info.value)
    assert message.startswith(f"{path}: member 'resnet/head/conv2d/kernel.npy' inflates ")
    assert "zip bomb" in message and "\n" not in message


def test_npz_larger_than_any_checkpoint_is_refused(small_npz, monkeypatch):
    sizes = [info.file_size for info in zipfile.ZipFile(small_npz).infolist()]
    monkeypatch.setattr(checkpoint, "MAX_NPZ_BYTES", sum(sizes) - 1)  # 8 GiB stands for any real checkpoint
    with pytest.raises(CheckpointError, match=f"^{small_npz}: member '.*' takes the uncompressed size past"):
        read_npz(small_npz)
    monkeypatch.setattr(checkpoint, "MAX_NPZ_BYTES", sum(sizes))
    assert len(read_npz(small_npz)) == len(sizes)


def npy_member(path, name, header, data):
    """An `.npz` at `path` holding one member `name`: an `.npy` header of `header` (descr, shape) and then `data`."""
    descr, shape = header
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, buffer.getvalue() + data)
    return str(path)


def test_npy_header_declaring_terabytes_is_refused_before_allocating(tmp_path):
    """A 323-byte member whose header declares (10^6, 10^6) float32 (3.64 TiB): numpy would try to allocate it."""
    key = "resnet/root_block/standardized_conv2d/kernel.npy"
    path = npy_member(tmp_path / "huge.npz", key, ("<f4", (10**6, 10**6)), os.urandom(195))
    assert zipfile.ZipFile(path).getinfo(key).file_size == 323
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            bit_keras.create_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert str(info.value) == (
        f"{path}: member {key!r} declares shape (1000000, 1000000) float32 (4,000,000,000,000 bytes) but holds "
        "195 bytes of data"
    )
    with pytest.raises(CheckpointError, match=r"declares shape \(4,\) float32 \(16 bytes\) but holds 20 bytes"):
        read_npz(npy_member(tmp_path / "long.npz", "x.npy", ("<f4", (4,)), bytes(20)))  # trailing data


@pytest.mark.parametrize(
    "descr,data,dtype",
    [("|O", bytes(8), "object"), ("<U3", bytes(12), "<U3"), ("|b1", bytes(2), "bool"), ([("a", "<f4")], bytes(8), "")],
    ids=["object", "str", "bool", "structured"],
)
def test_non_numeric_dtypes_are_refused_naming_the_member(descr, data, dtype, tmp_path):
    key = "resnet/group_norm/beta.npy"
    path = npy_member(tmp_path / "odd.npz", key, (descr, (len(data) // np.dtype(descr).itemsize,)), data)
    with pytest.raises(CheckpointError, match=f"^{path}: member {key!r} has dtype {dtype}.*: not numeric weights$"):
        read_npz(path)


def test_unreadable_member_is_named(tmp_path):
    path = tmp_path / "junk.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("resnet/group_norm/beta.npy", b"no npy header at all")
    with pytest.raises(CheckpointError, match=rf"^{path}: member 'resnet/group_norm/beta.npy' is unreadable \(.+\)$"):
        read_npz(str(path))


def test_read_npz_gives_what_np_load_gives(tmp_path):
    """Every numeric layout np.save writes: C and Fortran order, big-endian, scalars, empty arrays; writable."""
    arrays = {
        "c": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.arange(5, dtype=">i4"),
        "scalar": np.float16(1.5),
        "empty": np.zeros((0, 3), np.float32),
        "nested/key": np.ones(3, np.complex64),
    }
    np.savez_compressed(tmp_path / "all.npz", **arrays)
    read = read_npz(str(tmp_path / "all.npz"))
    with np.load(tmp_path / "all.npz") as expected:
        assert read.keys() == set(expected.files)
        for key in expected.files:
            assert read[key].dtype == expected[key].dtype and read[key].shape == expected[key].shape, key
            np.testing.assert_array_equal(read[key], expected[key])
            assert read[key].flags.writeable
    assert checkpoint.check_npz(str(tmp_path / "all.npz")) is None
