"""The command-line tools' console: this package's warnings and errors, not libraries' logs."""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
from typing import Iterator

from absl import flags, logging


def quiet_libraries() -> None:
  """Shows this package's warnings and errors only: no INFO, and no library's own logs
  (orbax logs every save and restore, and each failed write once per array, before the
  error says why). Does nothing when `--verbosity` is given on the command line.
  """
  if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  package = os.path.dirname(os.path.abspath(__file__))
  logging.get_absl_handler().addFilter(
      lambda record: record.pathname.startswith(package) or record.levelno >= py_logging.CRITICAL)


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException]) -> Iterator[None]:
  """Ends the program with `error: <message>` on stderr and exit status 1 on `kinds`."""
  try:
    yield
  except kinds as e:
    fail(str(e))


def fail(message: str) -> None:
  """Ends the program with `error: <message>` on stderr and exit status 1."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)
