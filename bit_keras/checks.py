"""One-line checks of user-given numbers, shared by every verb: 0, negatives, NaN and Inf are errors, never defaults."""

import math


def check_int(flag: str, value, minimum: int = 1, required: bool = False) -> None:
    """A one-line error unless `value` is an integer >= `minimum`, or None (where not `required`)."""
    if (value is not None or required) and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{flag} must be {what}, got {value!r}")


def check_finite(flag: str, value, positive: bool = False) -> None:
    """A one-line error unless `value` is None or a finite number > 0 (`positive`) or >= 0 (NaN fails both)."""
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and (value > 0 if positive else value >= 0) and value < math.inf):
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{flag} must be {what}, got {value!r}")
