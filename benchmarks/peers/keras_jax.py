"""A Keras model on JAX as jitted stateless steps, as the bit_keras and plain Keras peers run: inference, a training
step (softmax cross-entropy, SGD momentum, buffers donated), the peak memory, and the training step's convolutions
by element type before and after XLA compiled it."""

import collections
import contextlib
import re

from benchmarks import harness

# In a StableHLO line, the element types of a convolution's two operands, and of a convert's operand and result.
CONVOLUTION_TYPES = re.compile(r"stablehlo\.convolution.*:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)")
CONVERT_TYPES = re.compile(r"stablehlo\.convert .*:\s*\(tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>")


def device_batch(images, labels):
    """The images and the labels (as int32) on JAX's default device."""
    import jax

    return jax.device_put(images), jax.device_put(labels.astype("int32"))


def variable_values(model):
    """The values of the model's trainable and non-trainable variables."""
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def predictor(model):
    """A new jitted `model.stateless_call(trainable, non_trainable, images, training=False)`'s outputs."""
    import jax

    return jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])


def inference_step(model, images):
    """The jitted prediction of `images`, waited for."""
    import jax

    trainable, non_trainable = variable_values(model)
    predict = predictor(model)
    return lambda: jax.block_until_ready(predict(trainable, non_trainable, images))


def training_state(model, learning_rate, momentum):
    """Keras' SGD with momentum, built for `model`, and the step's state: trainable, non-trainable and optimizer
    values."""
    import keras

    optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    optimizer.build(model.trainable_variables)
    state = (*variable_values(model), [v.value for v in optimizer.variables])
    return optimizer, state


def training_step(model, optimizer, state, images, labels, tracing=contextlib.nullcontext):
    """value_and_grad of softmax cross-entropy through `model.stateless_call`, then `optimizer.stateless_apply`, jitted
    with the state donated, traced under `tracing()` and compiled here: `(step, lowered, compiled)`, the step waited
    for."""
    import jax
    import jax.numpy as jnp

    def loss_fn(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images, training=True)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), non_trainable

    def train_step(state, images, labels):
        trainable, non_trainable, optimizer_variables = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, images, labels
        )
        trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_variables)

    with tracing():
        lowered = jax.jit(train_step, donate_argnums=0).lower(state, images, labels)
    compiled = lowered.compile()

    def step():
        nonlocal state
        loss, state = compiled(state, images, labels)
        jax.block_until_ready((loss, state))

    return step, lowered, compiled


def peak_memory():
    """The accelerator's peak memory where JAX reports it, else this process's resident memory."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": stats["peak_bytes_in_use"], "peak_memory_of": "accelerator"}
    return harness.rss_memory()


def dtype_audit(stablehlo):
    """A StableHLO module's convolutions counted by their operands' element types (`{"bf16": n, "f32": m}`; "bf16 x
    f32" for mixed operands), and its converts between bf16 and f32."""
    convolutions = collections.Counter(
        lhs if lhs == rhs else f"{lhs} x {rhs}" for lhs, rhs in CONVOLUTION_TYPES.findall(stablehlo)
    )
    converts = sum({source, target} == {"bf16", "f32"} for source, target in CONVERT_TYPES.findall(stablehlo))
    return {"convolution_dtypes": dict(convolutions), "bf16_f32_converts": converts}


def compiled_audit(hlo):
    """The convolutions XLA compiled (`convolution` on a CPU, cuDNN custom calls on a GPU) counted by their result's
    element type: what runs after XLA's own type and layout passes (a CPU computes bf16 convolutions in f32)."""
    kinds = collections.Counter(
        match.group(1)
        for line in hlo.splitlines()
        if " convolution(" in line or "__cudnn$conv" in line
        if (match := re.search(r"=\s*\(?(\w+)\[", line))
    )
    return {"compiled_convolution_dtypes": dict(kinds)}
