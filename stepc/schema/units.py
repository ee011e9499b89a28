"""Byte sizes as researchers write them: an int, or "3.5GB" (powers of 1000) / "8GiB" (powers of 1024).

Prefixes are case-insensitive ("kB", "gib"), but the final B must be upper case: "Mb" is megabits,
and reading it as megabytes would be a silent factor of 8. A lower-case "m" (milli) is refused too.
"""

from __future__ import annotations

import re
from decimal import Decimal

UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
MAX_BYTES = 10**18  # 1 EB: larger budgets are typos, and would overflow the float arithmetic of the report
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """Return the number of bytes, rounded down; raise ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a byte count, got a boolean")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return _at_most_max(value, value)
    if not isinstance(value, str):
        raise ValueError(f"expected an int or a string like \"3.5GB\", got {type(value).__name__}")
    match = _PATTERN.match(value)
    written = match.group(2) if match else ""
    unit = written.upper() or "B"
    if match and unit in UNITS and written[-1:] == "b":
        canonical = unit.replace("IB", "iB")
        raise ValueError(f"{written!r} in {value!r} ends in a lower-case b, which means bits (Mb = megabits); "
                         f"write {canonical} for bytes, e.g. \"{match.group(1)}{canonical}\"")
    if match and unit in UNITS and written[:1] == "m":
        raise ValueError(f"{written!r} in {value!r} starts with a lower-case m, which means milli; write MB or MiB")
    if not match or unit not in UNITS:
        raise ValueError(
            f"cannot read {value!r} as a size; write an int of bytes or a number with one of the units "
            "B KB MB GB TB (powers of 1000) or KiB MiB GiB TiB (powers of 1024), e.g. \"3.5GB\""
        )
    try:
        amount = Decimal(match.group(1)) * UNITS[unit]
    except ArithmeticError as exc:  # decimal.Overflow for exponents like "1e999999GB"
        raise ValueError(f"{value!r} is too large; a budget is at most {MAX_BYTES:.0e} bytes") from exc
    if amount < 1:
        raise ValueError(f"must be at least 1 byte, got {value!r}")
    return _at_most_max(int(min(amount, MAX_BYTES + 1)), value)  # no million-digit ints for "1e999999B"


def _at_most_max(n: int, given: int | str) -> int:
    if n > MAX_BYTES:
        shown = repr(given) if len(repr(given)) <= 30 else repr(given)[:27] + "..."
        raise ValueError(f"{shown} is too large; a budget is at most {MAX_BYTES:.0e} bytes (1 EB)")
    return n


def format_bytes(n: float) -> str:
    """Decimal gigabytes with three decimals, the unit the paper reports (5.899 GB): the one way every
    memory figure is shown (console, report.md, plan.md, `stepc plan --gpu`), so they compare as printed."""
    return f"{n / 1e9:.3f} GB"


# What each memory figure is, in the words every table's legend uses (README "Memory figures").
UNIT_NOTE = "GB = 10^9 bytes"
MODEL_STATE = "model state = parameters + gradients + optimizer state of the whole model"
PROCESS_PEAK = "process peak = rank 0's peak memory (CUDA max allocated on a GPU, peak RSS on a CPU)"
DEVICE_PEAK = "estimate/GPU = predicted device peak per GPU (device accounting: model state, activations, buffers)"
