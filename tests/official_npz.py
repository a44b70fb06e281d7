"""Official BiT ``.npz`` checkpoint layout and a writer of random checkpoints (test helper).

Written from the official layout (the released .npz files' key names) only; does not import tensorflow, keras
or bit_keras.
Keys use the official prefix ``resnet/``; conv kernels are HWIO; everything is float32.
"""

import numpy as np

PREFIX = "resnet/"


def _channels(width):
    """Root channels, per-block mid channels (blocks 1..4) and pre-logits channels for a width multiplier."""
    root = int(64 * width)
    mids = [root * 2**b for b in range(4)]  # mid of block b (1-based) = int(64w) * 2**(b-1)
    return root, mids, 4 * mids[-1]  # pre-logits = 4 * mid of block 4 == int(2048w)


def official_shapes(block_units=(3, 4, 6, 3), width=1, num_classes=1000):
    """Return ``{key: shape}`` for every key of the official BiT checkpoint layout."""
    root, mids, pre = _channels(width)
    assert pre == int(2048 * width), (pre, width)
    shapes = {PREFIX + "root_block/standardized_conv2d/kernel": (7, 7, 3, root)}
    cin = root
    for b, (units, mid) in enumerate(zip(block_units, mids), start=1):
        for u in range(1, units + 1):
            p = f"{PREFIX}block{b}/unit{u:02d}/"
            shapes[p + "a/group_norm/gamma"] = (cin,)
            shapes[p + "a/group_norm/beta"] = (cin,)
            shapes[p + "a/standardized_conv2d/kernel"] = (1, 1, cin, mid)
            shapes[p + "b/group_norm/gamma"] = (mid,)
            shapes[p + "b/group_norm/beta"] = (mid,)
            shapes[p + "b/standardized_conv2d/kernel"] = (3, 3, mid, mid)
            shapes[p + "c/group_norm/gamma"] = (mid,)
            shapes[p + "c/group_norm/beta"] = (mid,)
            shapes[p + "c/standardized_conv2d/kernel"] = (1, 1, mid, 4 * mid)
            if u == 1:  # projection shortcut only on the first unit of each block
                shapes[p + "a/proj/standardized_conv2d/kernel"] = (1, 1, cin, 4 * mid)
            cin = 4 * mid
    shapes[PREFIX + "group_norm/gamma"] = (pre,)
    shapes[PREFIX + "group_norm/beta"] = (pre,)
    if num_classes:
        shapes[PREFIX + "head/conv2d/kernel"] = (1, 1, pre, num_classes)
        shapes[PREFIX + "head/conv2d/bias"] = (num_classes,)
    return shapes


def random_checkpoint(block_units=(3, 4, 6, 3), width=1, num_classes=1000, seed=0):
    """Random float32 params in the official layout, with realistic magnitudes."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in official_shapes(block_units, width, num_classes).items():
        if key.endswith("head/conv2d/kernel"):
            w = rng.standard_normal(shape) / np.sqrt(shape[2])  # logits O(1)
        elif key.endswith("head/conv2d/bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif key.endswith("kernel"):
            # trained-like scale (std 0.05, where the WS epsilon matters) plus a per-output-channel
            # mean offset so that standardization (centering) matters too
            w = 0.05 * (rng.standard_normal(shape) + 0.3 * rng.standard_normal(shape[-1]))
        elif key.endswith("gamma"):
            w = rng.uniform(0.2, 1.0, shape)  # trained GN gammas are mostly below 1
        elif key.endswith("beta"):
            w = 0.1 * rng.standard_normal(shape)
        else:
            raise KeyError(key)
        params[key] = np.asarray(w, dtype=np.float32)
    return params


def write_npz(path, params):
    """Write params like the official files: plain ``np.savez`` with slash-containing key names."""
    np.savez(path, **params)
