"""Command-line plumbing shared by the tools: `--config FILE[:ARG]` with `--config.a.b=value`
overrides (ml_collections style, but with one-line errors), `--policy.key=value` decoding
settings, argparse with one-line errors, and `command()`, the set-up every entry point shares."""
import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import os
import sys

import ml_collections

from evo_jax import backend
from evo_jax import decoding
from evo_jax.errors import ConfigError, UserError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class OneLineParser(argparse.ArgumentParser):
  """argparse, but a bad command line is a UserError (one line, exit status 2)."""

  def error(self, message):
    raise UserError(message)


def parse_bool(text, name):
  """true/1/yes or false/0/no (any case), for config fields and policy settings alike."""
  if text.lower() in TRUE:
    return True
  if text.lower() in FALSE:
    return False
  raise ConfigError(f"{name}: expected true or false, got {text!r}")


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
    return parse_bool(text, f"--config.{name}")
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


def parse_policy(name, overrides):
  """The policy `name` (decoding.POLICIES) with `--policy.key=value` overrides applied."""
  types = {f.name: f.type for f in dataclasses.fields(decoding.Policy)}
  settings = {}
  for item in overrides:
    key, text = split_setting(item, "--policy.")
    kind = types.get(key)
    if kind in (bool, "bool"):
      settings[key] = parse_bool(text, item.partition("=")[0])
      continue
    try:
      settings[key] = {int: int, "int": int, float: float, "float": float}.get(kind, str)(text)
    except ValueError:
      raise UserError(f"{item}: cannot parse {text!r} as {kind}") from None
  return decoding.make_policy(name, **settings)


@contextlib.contextmanager
def command():
  """What every entry point (`python -m evo_jax.X`) runs in: the JAX backend chosen for this
  machine (backend.choose_platform), and a UserError turned into `error: <message>` on stderr
  and exit status 2 instead of a traceback."""
  backend.choose_platform()
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
