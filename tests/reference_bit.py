"""Independent plain-numpy float64 reference forward pass of BiT (ResNet-v2 with GN + WS).

This is what the tests check bit_keras against, so it is written from the paper and the official code's numerics only
and must not import tensorflow, keras or bit_keras. Params use the official ``.npz`` layout (``resnet/`` keys,
HWIO kernels); images are NHWC in [0, 1].
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

P = "resnet/"


def standardize(w, eps=1e-10):
    """Weight standardization over H, W, Cin (all but the output axis), biased variance, eps inside sqrt."""
    w = np.asarray(w, np.float64)
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)  # biased (ddof=0)
    return (w - mean) / np.sqrt(var + eps)


def pad(x, p, value=0.0):
    """Pad H and W by p on each side (zeros unless told otherwise)."""
    return np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=value)


def conv2d(x, w, stride=1):
    """VALID NHWC x HWIO convolution (cross-correlation, like TF) via im2col + matmul."""
    kh, kw, cin, cout = w.shape
    if kh == kw == 1:  # 1x1 conv with stride s just subsamples x[:, ::s, ::s]
        return x[:, ::stride, ::stride, :] @ w[0, 0]
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # [N,Ho,Wo,C,kh,kw]
    n, ho, wo = win.shape[:3]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(n, ho, wo, kh * kw * cin)  # (i, j, c) order == HWIO
    return cols @ w.reshape(kh * kw * cin, cout)


def max_pool(x, k=3, stride=2):
    """VALID k x k max pool with stride."""
    return sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


def group_norm(x, gamma, beta, groups=32, eps=1e-5):
    """GroupNorm: stats per sample over (H, W, channels of the group), biased variance, eps inside sqrt."""
    n, h, w, c = x.shape
    assert c % groups == 0, (c, groups)
    xg = x.reshape(n, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    xg = (xg - mean) / np.sqrt(var + eps)
    return xg.reshape(n, h, w, c) * np.asarray(gamma, np.float64) + np.asarray(beta, np.float64)


def relu(x):
    return np.maximum(x, 0.0)


def reference_forward(params, images, block_units=(3, 4, 6, 3), width=1, groups=32, gn_eps=1e-5, ws_eps=1e-10):
    """BiT forward pass in float64. Returns stem, block1..block4, pre_logits and (if a head exists) logits.

    ``width`` is accepted for symmetry with the model constructors; channel counts come from the params.
    """
    del width
    conv = lambda x, key, stride=1: conv2d(x, standardize(params[key], ws_eps), stride)
    gn = lambda x, key: group_norm(x, params[key + "/gamma"], params[key + "/beta"], groups, gn_eps)

    out = {}
    x = np.asarray(images, np.float64) * 2.0 - 1.0  # [0, 1] -> [-1, 1]
    x = conv(pad(x, 3), P + "root_block/standardized_conv2d/kernel", 2)  # zero pad 3, 7x7/2 VALID
    x = max_pool(pad(x, 1), 3, 2)  # zero pad 1 (not -inf), 3x3/2 VALID max pool
    out["stem"] = x
    for b, units in enumerate(block_units, start=1):
        for u in range(1, units + 1):
            k = f"{P}block{b}/unit{u:02d}/"
            stride = 2 if (u == 1 and b > 1) else 1  # stride only on unit01 of blocks 2-4
            p = relu(gn(x, k + "a/group_norm"))  # pre-activation
            if k + "a/proj/standardized_conv2d/kernel" in params:
                shortcut = conv(p, k + "a/proj/standardized_conv2d/kernel", stride)  # 1x1 proj on p
            else:
                shortcut = x  # identity on raw x
            y = conv(p, k + "a/standardized_conv2d/kernel")  # 1x1, stride 1
            y = relu(gn(y, k + "b/group_norm"))
            y = conv(pad(y, 1), k + "b/standardized_conv2d/kernel", stride)  # zero pad 1, 3x3/stride VALID
            y = relu(gn(y, k + "c/group_norm"))
            y = conv(y, k + "c/standardized_conv2d/kernel")  # 1x1 to 4*mid
            x = y + shortcut
        out[f"block{b}"] = x
    x = relu(gn(x, P + "group_norm"))
    out["pre_logits"] = x.mean(axis=(1, 2))  # global average pool
    if P + "head/conv2d/kernel" in params:  # 1x1 conv with bias == dense on pooled vector
        out["logits"] = out["pre_logits"] @ np.asarray(params[P + "head/conv2d/kernel"], np.float64)[0, 0] + np.asarray(
            params[P + "head/conv2d/bias"], np.float64
        )
    return out
