"""BiT (ResNet-v2, GroupNorm + weight standardization) as a straightforward Keras 3 user writes it: Keras'
GroupNormalization, ReLU, and a Conv2D that standardizes its kernel in `convolution_op`. Its steps are
`keras_jax`'s."""


def build(block_units, width, num_classes):
    """The model for `block_units` units per block at `width`, randomly initialized, taking images in [0, 1]."""
    import keras
    from keras import layers, ops

    class StandardizedConv2D(layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
            variance = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
            return super().convolution_op(inputs, (kernel - mean) / ops.sqrt(variance + 1e-10))

    def conv(filters, size, strides=1):
        return StandardizedConv2D(filters, size, strides=strides, use_bias=False)

    def norm_relu(x):
        return layers.ReLU()(layers.GroupNormalization(groups=32, epsilon=1e-5)(x))

    images = keras.Input((None, None, 3))
    x = layers.Rescaling(2.0, offset=-1.0)(images)  # [0, 1] -> [-1, 1]
    root = int(64 * width)
    x = conv(root, 7, 2)(layers.ZeroPadding2D(3)(x))
    x = layers.MaxPooling2D(3, 2)(layers.ZeroPadding2D(1)(x))
    for block, units in enumerate(block_units):
        mid = root * 2**block
        for unit in range(units):
            stride = 2 if unit == 0 and block > 0 else 1
            preact = norm_relu(x)
            shortcut = conv(4 * mid, 1, stride)(preact) if unit == 0 else x
            y = conv(mid, 1)(preact)
            y = conv(mid, 3, stride)(layers.ZeroPadding2D(1)(norm_relu(y)))
            x = layers.Add()([conv(4 * mid, 1)(norm_relu(y)), shortcut])
    x = layers.GlobalAveragePooling2D()(norm_relu(x))
    logits = layers.Dense(num_classes, dtype="float32")(x)  # float32 logits, as bit_keras's head
    return keras.Model(images, logits)
