"""The device mesh and where arrays live on it.

The mesh's axes and sizes come from the config (`mesh.<axis> = size`, -1 meaning "the rest of
the devices"). Batches are split over the data axis; parameters and optimizer state are
replicated (data parallelism).
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from evo_jax.errors import UserError

DATA_AXES = ("data",)


class MeshError(UserError):
  pass


def mesh_shape(mesh_cfg, n_devices):
  """{axis: size} with -1 resolved; a one-line MeshError when sizes do not fit the devices."""
  sizes = dict(mesh_cfg.items())
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if n_devices % known:
      raise MeshError(f"mesh {sizes} does not divide the {n_devices} devices")
    sizes[unknown[0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                    f"there are {n_devices}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def data_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(a for a in DATA_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh, global_batch_size: int):
  """Assembles the global batch from this process's rows (one process: all of them)."""
  if global_batch_size % data_size(mesh):
    raise MeshError(f"data.batch_size={global_batch_size} is not divisible by the "
                    f"{data_size(mesh)} data-parallel devices")
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
