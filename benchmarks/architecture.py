"""The shapes of a BiT architecture that the benchmarks time or count: its convolutions, its group norms and its
FLOPs per image. Keras on any backend; nothing here touches a device."""

NUM_CLASSES = 1000


def architecture(name):
    """The architecture of an architecture or checkpoint name (`"BiT-M-R50x1"` -> `"R50x1"`), its units per block
    and its width; ValueError naming an unknown one."""
    from bit_keras.models import zoo

    arch = zoo.CHECKPOINTS[name].arch if name in zoo.CHECKPOINTS else name
    return arch, *zoo.parse_architecture(arch)


def _layers(arch, resolution):
    """The layers of the headless model of `arch` at `resolution`."""
    from bit_keras.models import zoo

    return zoo.create_model(arch, num_classes=0, input_shape=(resolution, resolution, 3)).backbone.layers


def conv_problems(arch, batch, resolution):
    """`(input shape NHWC, kernel shape HWIO, stride)` of every convolution of `arch` at `batch` and `resolution`,
    in model order."""
    from bit_keras.models.layers import PreActBottleneck

    problems = []
    for layer in _layers(arch, resolution):
        if isinstance(layer, PreActBottleneck):
            (_, height, width, _), (_, out_height, out_width, _) = layer.input.shape, layer.output.shape
            inputs = {  # conv_b sees its 1-pixel zero padding
                "conv_a": (height, width),
                "conv_b": (height + 2, width + 2),
                "conv_c": (out_height, out_width),
                "proj": (height, width),
            }
            for name, (h, w) in inputs.items():
                conv = getattr(layer, name)
                if conv is not None:
                    problems.append(((batch, h, w, conv.kernel.shape[2]), tuple(conv.kernel.shape), conv.strides[0]))
        elif layer.name == "root_conv":
            problems.append(((batch, *layer.input.shape[1:]), tuple(layer.kernel.shape), layer.strides[0]))
    return problems


def group_norm_shapes(arch, batch, resolution):
    """`(batch, height, width, channels)` of every GroupNorm input of `arch`, in model order."""
    from bit_keras.models.layers import PreActBottleneck

    shapes = []
    for layer in _layers(arch, resolution):
        if isinstance(layer, PreActBottleneck):
            (_, h, w, c), (_, oh, ow, _) = layer.input.shape, layer.output.shape
            shapes += [(batch, h, w, c), (batch, h, w, layer.filters), (batch, oh, ow, layer.filters)]
        elif layer.name == "pre_head_norm":
            shapes.append((batch, *layer.input.shape[1:]))
    return shapes


def forward_flops_per_image(arch, resolution, num_classes=NUM_CLASSES):
    """2 x the multiply-adds of every convolution and of the head of a BiT `arch` at `resolution`, from its
    architecture (GroupNorm, ReLU, pooling and weight standardization are left out)."""
    from bit_keras.models import zoo

    block_units, width = zoo.parse_architecture(arch)
    root = zoo.channels(width)
    size = (resolution - 1) // 2 + 1  # the 7x7/2 root convolution, padded by 3
    macs = size * size * 7 * 7 * 3 * root
    size = (size - 1) // 2 + 1  # the 3x3/2 max pool, padded by 1
    inputs = root
    for block, units in enumerate(block_units):
        mid = root * 2**block
        for unit in range(units):
            stride = 2 if unit == 0 and block > 0 else 1
            out = (size - 1) // stride + 1
            macs += size * size * inputs * mid  # conv_a, 1x1
            macs += out * out * 3 * 3 * mid * mid  # conv_b, 3x3 with the stride
            macs += out * out * mid * 4 * mid  # conv_c, 1x1
            if unit == 0:
                macs += out * out * inputs * 4 * mid  # the projection, 1x1 with the stride
            size, inputs = out, 4 * mid
    return 2 * (macs + inputs * num_classes)


def task_flops(forward_flops, task):
    return forward_flops * (3 if task == "training" else 1)  # backward: twice the forward
