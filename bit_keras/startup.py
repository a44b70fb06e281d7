"""Keeping TensorFlow's native start-up lines (oneDNN, CUDA, CPU features) off the user's screen."""

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 inside the block. TensorFlow prints its start-up
    lines there through absl before any log level applies, so no setting turns them off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
