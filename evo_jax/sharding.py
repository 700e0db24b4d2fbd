"""The device mesh and where arrays live on it.

The mesh's axes and sizes come from the config (`mesh.data`, `mesh.fsdp`, `mesh.tensor`; -1
means "the rest of the devices"). Every parameter carries logical axis names (model.py); the
rules in `sharding.rules` map them to mesh axes, so the sharding policy is data in the config:
replicated data parallelism, FSDP (parameters and optimizer state split over `fsdp`) and tensor
parallelism are all settings of the same code. Batches are split over the data-like axes;
activations carry logical names too (batch, length, embed, vocab) under the same rules.
"""
import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evo_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the batch is split over both: FSDP is data parallelism too


class MeshError(UserError):
  pass


def mesh_shape(mesh_cfg, n_devices):
  """{axis: size} with -1 resolved; a one-line MeshError when sizes do not fit the devices."""
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if n_devices % known:
      raise MeshError(f"mesh {dict(mesh_cfg)} does not divide the {n_devices} devices")
    sizes[unknown[0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    raise MeshError(f"mesh {dict(mesh_cfg)} needs {math.prod(sizes.values())} devices, "
                    f"there are {n_devices}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def logical_rules(rules_cfg):
  """Config rules {logical: mesh axis, tuple of axes, or None} as flax's list of pairs."""
  return tuple((name, tuple(v) if isinstance(v, (list, tuple)) else v)
               for name, v in rules_cfg.items())


# The (mesh, rules) under which `constrain` pins activations; None: it does nothing.
_activation_sharding = contextvars.ContextVar("evo_jax_activation_sharding", default=None)


def constrain(x, names):
  """Pins an activation's sharding by logical axis names, when traced under
  `traced_under_rules`. (Not flax's global-mesh context: under it, flax also re-applies the
  parameter constraints, which breaks on DenseGeneral's flattened kernels.)"""
  active = _activation_sharding.get()
  if active is None:
    return x
  mesh, rules = active
  return nn.with_logical_constraint(x, names, rules=rules, mesh=mesh)


class traced_under_rules:
  """A jitted function whose tracing (a call or `.lower`) sees the mesh and logical rules, so
  that the activation constraints (`constrain`) take effect."""

  def __init__(self, jitted, mesh: Mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  @contextlib.contextmanager
  def _in_scope(self):
    token = _activation_sharding.set((self.mesh, self.rules))
    try:
      yield
    finally:
      _activation_sharding.reset(token)

  def __call__(self, *args):
    with self._in_scope():
      return self.jitted(*args)

  def lower(self, *args):
    with self._in_scope():
      return self.jitted.lower(*args)


def data_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(mesh: Mesh, global_batch_size: int, micro_batches: int = 1):
  """Every micro-batch must split evenly over the data-parallel devices."""
  if global_batch_size % (micro_batches * data_size(mesh)):
    raise MeshError(f"data.batch_size={global_batch_size} is not divisible by "
                    f"train.grad_accum_steps={micro_batches} x the {data_size(mesh)} "
                    f"data-parallel devices (mesh.data x mesh.fsdp)")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tree_shardings(boxed_abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree whose leaves may be flax LogicallyPartitioned boxes (from
  eval_shape of an init that keeps the boxes); unboxed leaves are replicated. The result has
  the structure of the unboxed tree."""
  logical_specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def global_batch(local_batch, mesh: Mesh):
  """Assembles the global batch from this process's rows (one process: all of them)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
