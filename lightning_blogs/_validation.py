"""Small argument checks shared by the mechanism, the adapters, the data modules and the models.

Every check raises :class:`ValueError` whose message starts with the argument name and states
the allowed range, e.g. ``"batch_size must be a positive integer, got 0"``. Booleans are
rejected where an integer is expected (``True`` is an ``int`` in Python, but never what a
caller meant).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as ``int`` if it is an integer >= 1, else raise ``ValueError``."""
    if not _is_int(value) or int(value) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_non_negative_int(name: str, value: object) -> int:
    """Return ``value`` as ``int`` if it is an integer >= 0, else raise ``ValueError``."""
    if not _is_int(value) or int(value) < 0:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_int(name: str, value: object) -> int:
    """Return ``value`` as ``int`` if it is an integer (any sign), else raise ``ValueError``."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_open_unit_interval(name: str, value: object) -> float:
    """Return ``value`` as ``float`` if it is a real number in the open interval (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")
    return float(value)


def check_positive_float(name: str, value: object) -> float:
    """Return ``value`` as ``float`` if it is a finite real number > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative_float(name: str, value: object) -> float:
    """Return ``value`` as ``float`` if it is a finite real number >= 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_int_sequence(name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ints if it is a sequence of integers >= 1.

    Args:
        name: argument name used in the error message.
        value: the sequence to check (list or tuple; a bare ``str`` or ``int`` is rejected).
        allow_empty: whether an empty sequence is acceptable.
    """
    what = "a (possibly empty)" if allow_empty else "a non-empty"
    message = f"{name} must be {what} sequence of positive integers, got {value!r}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(message)
    if not allow_empty and len(value) == 0:
        raise ValueError(message)
    if not all(_is_int(v) and int(v) >= 1 for v in value):
        raise ValueError(message)
    return tuple(int(v) for v in value)
