"""One-line checks of user-given values, shared by every verb: 0, negatives, NaN and Inf are errors, never defaults.

Messages name what the user typed: the Python argument (`labels=FILE`) in Python, the flag (`--labels FILE`) in the
`bit-keras` command, which runs inside `command_line()`."""

import contextlib
import contextvars
import math
import unicodedata

_COMMAND_LINE = contextvars.ContextVar("bit_keras_command_line", default=False)


@contextlib.contextmanager
def command_line():
    """Inside the block, `arg` names command-line flags (the `bit-keras` command runs in one)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def arg(name: str, value: str | None = None) -> str:
    """How a message names the argument `name` (given `value`): `--name VALUE` on the command line, `name=VALUE` in
    Python; without `value`, `--name` or `name`."""
    if _COMMAND_LINE.get():
        return f"--{name}" if value is None else f"--{name} {value}"
    return name if value is None else f"{name}={value}"


def check_int(flag: str, value, minimum: int = 1, required: bool = False) -> None:
    """A one-line error unless `value` is an integer >= `minimum`, or None (where not `required`)."""
    if (value is not None or required) and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{arg(flag)} must be {what}, got {value!r}")


def check_finite(flag: str, value, positive: bool = False) -> None:
    """A one-line error unless `value` is None or a finite number > 0 (`positive`) or >= 0 (NaN fails both)."""
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and (value > 0 if positive else value >= 0) and value < math.inf):
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{arg(flag)} must be {what}, got {value!r}")


def control_character(text: str) -> str | None:
    """The first line break or other control character in `text` (as `repr` shows it), or None. Class names are
    stored one per line, and shown in logs and tables: they may hold none."""
    found = next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    return None if found is None else repr(found)
