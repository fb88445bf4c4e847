"""The number checks the model's configs and layers share: one rule each, one message each."""

from __future__ import annotations

from typing import Any


def positive_ints(**values: Any) -> None:
  """ValueError naming the first argument that is not an int > 0 (a bool is not an int)."""
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def non_negative_ints(**values: Any) -> None:
  """ValueError naming the first argument that is not an int >= 0."""
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def positive_floats(**values: Any) -> None:
  """ValueError naming the first argument that is not a finite number > 0."""
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value < float("inf")):
      raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def given(**values: Any) -> dict[str, Any]:
  """The arguments that are not None (optional settings): `positive_ints(**given(w=w))`."""
  return {name: value for name, value in values.items() if value is not None}
