"""The files that command-line flags name, read or written whole: a one-line UserError for a
missing file, a directory where a file is expected, invalid UTF-8 or a failed write, and no
temporary file left behind. (The training corpus has its own reader: data.py.)"""
import os

from evo_jax import paths
from evo_jax.errors import UserError


def read_text(path, what="file"):
  """The UTF-8 text of `path`; `what` names the flag's file in the error ("prompts file")."""
  if os.path.isdir(path):
    raise UserError(f"{what} {path} is a directory, not a file")
  if not os.path.isfile(path):
    raise UserError(f"{what} not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"{what} {path} is not valid UTF-8 (line {line}, byte {e.start})") from None


def check_output(path, what="output"):
  """Fails early (before any work) for an output path that names a directory."""
  if os.path.isdir(path):
    raise UserError(f"{what} {path} is a directory: give a file name")


def write_text(path, text, what="output"):
  """Writes `path` whole or not at all: a failed write never leaves a half file, a temporary
  file, or loses the old one."""
  check_output(path, what)
  try:
    paths.write_text(path, text)
  except OSError as e:
    raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None
