"""Keeping TensorFlow's native start-up lines (oneDNN, CUDA, CPU features, absl) off the user's screen, unless
`BIT_KERAS_VERBOSE=1` (`bit-keras --verbose`) asks for them."""

import contextlib
import os
import sys

VERBOSE = "BIT_KERAS_VERBOSE"


def verbose() -> bool:
    """Whether TensorFlow's start-up lines are wanted (`BIT_KERAS_VERBOSE` set, and not to 0)."""
    return os.environ.get(VERBOSE, "0") not in ("", "0")


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 inside the block, unless `verbose()`. TensorFlow prints
    its start-up lines there through absl before any log level applies, so no setting turns them off."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_keras():
    """Import Keras quietly, on TensorFlow with TensorFlow's INFO lines (XLA service, ...), which say nothing to users,
    off too (`TF_CPP_MIN_LOG_LEVEL=1` unless set, verbose or TensorFlow is imported already). On TensorFlow the
    physical devices are listed then, quietly: a CPU host's failed `cuInit` is printed once, at that first look.
    Listing physical devices initializes no logical device, so a `MultiWorkerMirroredStrategy` created afterwards
    can still configure its collectives (listing logical devices would prevent it)."""
    if not verbose() and "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with quiet_native_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()
    return keras
