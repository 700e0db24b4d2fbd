"""Command-line plumbing shared by the tools: `--config FILE[:ARG]` with `--config.a.b=value`
overrides (ml_collections style, but with one-line errors), and the user-error exit."""
import argparse
import ast
import contextlib
import importlib.util
import os
import sys

import ml_collections

from evo_jax.errors import ConfigError, UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py` or `path.py:arg` -> the file's get_config() or get_config(arg), locked so that
  an unknown key is an error."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location("evo_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  cfg.lock()
  return cfg


def _parse_value(text, current, name):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{name}: expected true or false, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{name}: cannot parse {text!r}") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, (list, int, float)):
    value = tuple(value) if isinstance(value, list) else (value,)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f"--config.{name}: expected {type(current).__name__}, got {text!r}")
  return value


def apply_override(cfg, name, text):
  path = name.split(".")
  node = cfg
  for key in path[:-1]:
    if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key: {name}")
    node = node[key]
  leaf = path[-1]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"unknown config key: {name}")
  with node.unlocked():
    node[leaf] = _parse_value(text, node[leaf], name)


def parse_args(argv, description, extra=None):
  """-> (config, argparse namespace). `extra(parser)` may add tool-specific flags."""
  parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
  parser.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
  parser.add_argument("--workdir", required=True, help="where checkpoints and metrics go")
  if extra:
    extra(parser)
  args, rest = parser.parse_known_args(argv)
  cfg = load_config_file(args.config)
  apply_overrides(cfg, rest)
  return cfg, args


def split_setting(item, prefix):
  """`--prefix.key=value` -> (key, value text); anything else is a one-line error."""
  if not item.startswith(prefix):
    raise ConfigError(f"unknown argument: {item}")
  key, eq, text = item[len(prefix):].partition("=")
  if not eq:
    raise ConfigError(f"{item}: settings are written {prefix}key=value")
  return key, text


def apply_overrides(cfg, items):
  """Applies `--config.a.b=value` arguments; anything else is an error."""
  for item in items:
    apply_override(cfg, *split_setting(item, "--config."))


@contextlib.contextmanager
def user_errors():
  """Turns a UserError into `error: <message>` on stderr and exit status 2."""
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
