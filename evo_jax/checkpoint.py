"""Orbax checkpoints of a run: the train state, the data iterator's position and the config,
saved together under WORKDIR/checkpoints/<step>/, so that rerunning the same command resumes
exactly where the last save stopped."""
import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from evo_jax.errors import UserError

CONFIG_FILE = "config.json"


class CheckpointError(UserError):
  pass


class RunCheckpoints:
  def __init__(self, workdir, keep=2, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iterator, config_dict):
    """data_iterator None: a state that no data has flowed into yet (an imported model)."""
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def has_data(self, step):
    """Whether the checkpoint at `step` holds a data iterator position."""
    return os.path.isdir(os.path.join(self.directory, str(step), "data"))

  def restore(self, step, abstract_state, data_iterator=None):
    """The state at `step` laid out like abstract_state (shapes, dtypes, shardings); the data
    iterator, when given, is moved in place to where it was at that step."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying shardings, the target layout of a restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def read_config(workdir):
  """The config dict saved in a workdir, or None when the workdir holds no run."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config(workdir, config_dict):
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp{os.getpid()}"   # a writer's own: another's rename cannot take it away
  with open(tmp, "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
