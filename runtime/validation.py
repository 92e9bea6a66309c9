"""The one set of rules for every number a user gives llmc, on the command line or in an API request.

Each check names the parameter as the user wrote it and says what is allowed; the CLI prints the
message, the server answers it as a 400 with the parameter in the error's `param`. Floats must be
finite: Python's JSON parser accepts NaN and Infinity, and NaN slips through every comparison.
"""

from __future__ import annotations

import math

from llmc.errors import LlmcError

MAX_SEED = 2**63 - 1
MAX_PORT = 65535


class InvalidParameter(LlmcError):
    """A parameter out of its range; `name` is the parameter as the user spelled it."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def finite(name: str, value: float) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise InvalidParameter(name, f"{name} must be a finite number, got an integer of {len(str(value))} digits") \
            from None
    if not math.isfinite(number):
        raise InvalidParameter(name, f"{name} must be a finite number, got {value}")
    return number


def at_least(name: str, value: float, low: float) -> float:
    if not value >= low:
        raise InvalidParameter(name, f"{name} must be at least {low}, got {value}")
    return value


def in_range(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise InvalidParameter(name, f"{name} must be between {low} and {high}, got {value}")
    return value


def port(value: int) -> int:
    """A TCP port to listen on (0: any free port)."""
    return int(in_range("port", value, 0, MAX_PORT))
