"""Argument checks shared by the entry points, so that "an int" means one thing everywhere: a
Python or NumPy integer, never a bool (``True`` is an ``int`` to Python, never a count here)."""
from __future__ import annotations

import numbers


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(owner: str, name: str, value) -> int:
  """``value`` as an int; ValueError naming ``owner`` and ``name`` unless it is an int >= 1."""
  if not is_int(value) or value < 1:
    raise ValueError(f"{owner}: {name}={value!r} must be a positive int")
  return int(value)
