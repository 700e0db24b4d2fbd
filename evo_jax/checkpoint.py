"""Orbax checkpoints of a run: the train state, the data iterator's position, the config and
the state's fingerprint, saved together under WORKDIR/checkpoints/<step>/, so that rerunning the
same command resumes exactly where the last save stopped.

The fingerprint (two position-weighted sums of each array's bits, computed on the devices
where the array lives) is checked at every restore: a checkpoint whose bytes changed on disk,
or that cannot be read at all, is `damaged`. Training then falls back to the newest intact
checkpoint (`restore_newest_intact`, with a warning; the damaged ones are moved aside to
checkpoints/damaged-<step>); sample and evaluate refuse it in one line."""
import json
import logging
import os
import re
import sys
import zlib

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from evo_jax import paths
from evo_jax.errors import UserError

CONFIG_FILE = "config.json"


class CheckpointError(UserError):
  pass


class DamagedCheckpointError(CheckpointError):
  pass


def _bits(x):
  """The array's bits as uint32, one element each (4-, 2- and 1-byte types)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _array_fingerprints(leaves):
  out = []
  for x in leaves:
    bits = _bits(x)
    i = jax.lax.iota(jnp.uint32, bits.shape[0])
    # Odd weights: any one changed element changes each sum (mod 2^32).
    out.append(jnp.stack([jnp.sum(bits * (i * jnp.uint32(2654435761) + jnp.uint32(1))),
                          jnp.sum((bits ^ jnp.uint32(0x9E3779B9)) * (i * jnp.uint32(40503)
                                                                      + jnp.uint32(7)))]))
  return out


def fingerprint(tree):
  """{array path: 16 hex digits} for every array of a (sharded) pytree: a pass over each array
  on its own devices, so it costs about one read of the state."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0])
  sums = jax.device_get(_array_fingerprints(list(leaves)))
  return {jax.tree_util.keystr(p): f"{int(a):08x}{int(b):08x}" for p, (a, b) in zip(paths, sums)}


class RunCheckpoints:
  def __init__(self, workdir, keep=2, async_save=True):
    self.directory = paths.path(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "fingerprint": ocp.JsonCheckpointHandler(),
        })
    self._unlisted = set()    # saved here, file list not yet written

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iterator, config_dict):
    """data_iterator None: a state that no data has flowed into yet (an imported model)."""
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict),
                 fingerprint=ocp.args.JsonSave(fingerprint(state)))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self.wait()           # the previous save finished: its file list is written
      self.manager.save(step, args=ocp.args.Composite(**items))
      self._unlisted.add(step)
    except CheckpointError:
      raise
    except Exception as e:  # a full disk, a read-only folder: the previous checkpoints stay
      raise self._save_error(e) from None

  def _save_error(self, e):
    return CheckpointError(f"cannot save a checkpoint in {self.directory}: {root_cause(e)}")

  def has_data(self, step):
    """Whether the checkpoint at `step` holds a data iterator position."""
    return (self.directory / str(step) / "data").is_dir()

  def has_fingerprint(self, step):
    return (self.directory / str(step) / "fingerprint").is_dir()

  def restore(self, step, abstract_state, data_iterator=None):
    """The state at `step` laid out like abstract_state (shapes, dtypes, shardings); the data
    iterator, when given (and saved: see has_data), is moved in place to where it was at that
    step. A checkpoint whose files, metadata or arrays are not those saved:
    DamagedCheckpointError; one that holds another model's arrays: ValueError."""
    where = f"{self.directory}/{step}"
    check_files(self.directory / str(step))
    self._check_shapes(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    elastic = None
    if data_iterator is not None and self.has_data(step):   # not in an imported model's
      elastic = self._data_states_of_other_process_count(step, data_iterator)
      if elastic is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    check = self.has_fingerprint(step)     # checkpoints saved before fingerprints: unchecked
    if check:
      items["fingerprint"] = ocp.args.JsonRestore()
    try:
      with quiet_orbax():
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # TensorStore, asyncio, OSError: unreadable
      raise DamagedCheckpointError(f"checkpoint {where} is damaged: {root_cause(e)}") from None
    if check:
      found = fingerprint(restored["state"])
      changed = [k for k, v in restored["fingerprint"].items() if found.get(k) != v]
      if changed or set(found) != set(restored["fingerprint"]):
        raise DamagedCheckpointError(
            f"checkpoint {where} is damaged: {len(changed)} arrays differ from the fingerprint "
            f"saved with them (the first: {changed[0] if changed else 'the array list'})")
    if elastic is not None:
      data_iterator.set_elastic_state(elastic)
    return restored["state"]

  def _data_states_of_other_process_count(self, step, data_iterator):
    """None if the checkpoint's data position was saved by as many processes as run now;
    else every saved process's state, for an iterator that can resume on another number of
    processes (a prepared corpus: evo_jax/prepared.py); a one-line CheckpointError for one
    that cannot."""
    files = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
    counts = {int(f.name.rsplit("-of-", 1)[1][:-len(".json")]) for f in files}
    if not counts or counts == {jax.process_count()}:
      return None
    saved = max(counts)
    if not hasattr(data_iterator, "set_elastic_state"):
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} was saved by {saved} process"
          f"{'es' * (saved > 1)}, and the data position of a raw corpus resumes only on as many "
          f"(this run has {jax.process_count()}): prepare the corpus (python -m "
          f"evo_jax.prepare) to resume on any number")
    states = []
    for path in files:
      if path.name.endswith(f"-of-{saved}.json"):
        states.append(json.loads(path.read_text()))
    return states

  def _check_shapes(self, step, abstract_state):
    """ValueError naming the first array whose shape or dtype is not the model's."""
    try:
      with quiet_orbax():
        meta = self.manager.item_metadata(step)["state"]
      saved = {_name(p): (tuple(m.shape), str(m.dtype))
               for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    except Exception as e:
      raise DamagedCheckpointError(f"checkpoint {self.directory}/{step} is damaged: its "
                                   f"metadata cannot be read ({root_cause(e)})") from None
    want = {_name(p): (tuple(a.shape), str(a.dtype))
            for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    for name in sorted(set(saved) | set(want)):
      if saved.get(name) != want.get(name):
        raise ValueError(f"{name} is {saved.get(name, 'absent')} there, "
                         f"{want.get(name, 'absent')} in the model")

  def restore_newest_intact(self, abstract_state, data_iterator=None, log=print):
    """(step, state) of the newest checkpoint that restores intact, or (None, None) when there
    is none at all. Each damaged one on the way is reported by `log` and, once an intact one
    is found, moved aside to checkpoints/damaged-<step> (kept for inspection; a rerun does not
    trip on it again). Every checkpoint damaged: a one-line CheckpointError, and nothing moved
    (so that a rerun does not quietly start from scratch)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except DamagedCheckpointError as e:
        log(f"warning: {e}; falling back to the previous checkpoint")
        damaged.append(step)
        continue
      for bad in damaged:
        self.move_aside(bad)
      return step, state
    if steps:
      raise CheckpointError(f"every checkpoint in {self.directory} is damaged (steps "
                            f"{', '.join(map(str, steps))}): move them away to start afresh")
    return None, None

  def move_aside(self, step):
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(self.directory / f"damaged-{step}")
    if jax.process_count() > 1:   # every process sees the move before it looks again
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()

  def wait(self):
    """Waits for the saves in flight; writes the file list of each finished checkpoint."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from None
    if jax.process_index() == 0:
      for step in self._unlisted & set(self.manager.all_steps()):
        write_file_list(self.directory / str(step))
    self._unlisted = set()

  def close(self):
    self.wait()
    self.manager.close()


def root_cause(e):
  """The innermost exception's first line: what went wrong, without Orbax's wrapping."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  first = lines[0] if lines else ""
  return f"{type(e).__name__}: {first[:240] + ' ...' if len(first) > 240 else first}"


def _name(path):
  """An array's path as a dotted name, the same for a saved metadata tree and the state."""
  return re.sub(r"[\[\]'.]+", ".", jax.tree_util.keystr(path)).strip(".")


# Each finished checkpoint's file list (FILES_NAME in its folder): every file's size, and a
# checksum of the small ones (Orbax's metadata and manifests), so that a truncated, deleted or
# altered file is found before Orbax reads it. The arrays' own bytes are the fingerprint's.
FILES_NAME = "files.json"
SMALL_FILE = 1 << 20


def _file_list(step_dir):
  out = {}
  step_dir = paths.path(step_dir)
  for folder, _, names in step_dir.walk():
    for name in names:
      path = folder / name
      rel = os.fspath(path.relative_to(step_dir))
      if rel != FILES_NAME:
        size = path.stat().length
        out[rel] = [size, zlib.crc32(path.read_bytes()) if size <= SMALL_FILE else None]
  return out


def write_file_list(step_dir):
  paths.write_text(paths.path(step_dir) / FILES_NAME, json.dumps(_file_list(step_dir)))


def check_files(step_dir):
  """DamagedCheckpointError naming the first file that is missing, cut short or altered (a
  checkpoint without a file list, saved before it existed or killed before it was written:
  not checked here)."""
  path = paths.path(step_dir) / FILES_NAME
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: {FILES_NAME} cannot be "
                                 f"read") from None
  found = _file_list(step_dir)
  for rel, (size, crc) in sorted(saved.items()):
    if rel not in found:
      raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: {rel} is missing")
    if found[rel][0] != size:
      raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: {rel} has "
                                   f"{found[rel][0]} bytes, {size} when saved")
    if crc is not None and found[rel][1] != crc:
      raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: {rel} differs from "
                                   f"what was saved (checksum)")


class quiet_orbax:
  """Orbax and absl log a failed read at ERROR with long tracebacks; the caller reports it in
  one line instead."""

  def __enter__(self):
    self.loggers = [logging.getLogger(n) for n in ("absl", "orbax", "tensorstore", "asyncio")]
    self.levels = [lg.level for lg in self.loggers]
    for lg in self.loggers:
      lg.setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    for lg, level in zip(self.loggers, self.levels):
      lg.setLevel(level)


class _NoOrbaxErrors(logging.Filter):
  """A failed save is logged by Orbax's background thread at ERROR with its traceback, and
  then raised to us, which reports it in one line (RunCheckpoints.wait)."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


logging.getLogger("absl").addFilter(_NoOrbaxErrors())


def _drop_closed_loop_errors(hook):
  """When one write or read of a checkpoint fails, Orbax closes its event loop while
  TensorStore still completes the others; each completion then reports 'RuntimeError: Event
  loop is closed' as an unraisable exception, long after the failure has been reported."""
  def unraisablehook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)
  return unraisablehook


sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying shardings, the target layout of a restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def read_config(workdir):
  """The config dict saved in a workdir, or None when the workdir holds no run."""
  path = paths.path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def write_config(workdir, config_dict):
  paths.write_text(paths.path(workdir) / CONFIG_FILE,
                   json.dumps(config_dict, indent=2, sort_keys=True))
