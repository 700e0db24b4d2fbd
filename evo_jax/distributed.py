"""Joining a multi-process run: `jax.distributed.initialize`, automatic or explicit.

- On a TPU pod and under SLURM, JAX finds the coordinator, the process count and this
  process's id itself; evo_jax asks it to whenever it sees such an environment.
- Elsewhere (several processes on one machine, or hosts without a scheduler), pass
  `--coordinator_address HOST:PORT --num_processes N --process_id I` to every process.
- With neither, the run is a single process and nothing is initialised.

After this, `jax.devices()` lists every process's devices, the mesh spans all of them, each
process reads its own shard of the data (data.py) and Orbax saves from all of them.
"""
import os
import socket
import time

import jax

from evo_jax.errors import UserError


class DistributedError(UserError):
  pass


def add_flags(parser):
  parser.add_argument("--coordinator_address", default=None,
                      help="HOST:PORT of process 0 (explicit multi-process runs)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--distributed_timeout", type=int, default=300,
                      help="seconds to wait for every process to join")


def cluster_detected(environ=os.environ):
  """A multi-process environment JAX detects on its own: SLURM with several tasks, or the
  workers of a TPU pod slice."""
  if int(environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def wait_for_coordinator(address, timeout_s):
  """Waits until process 0's coordinator accepts connections. JAX's own client aborts the
  whole process (a C++ check failure, not an exception) when it cannot register in time, so
  an unreachable address is caught here, with a readable error."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address {address!r} is not HOST:PORT")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1.0).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(f"could not reach the coordinator {address} within {timeout_s} s "
                               f"({e.strerror or e}); is process 0 running?") from None
      time.sleep(0.5)


def initialize(args, environ=os.environ):
  """Initialises jax.distributed from the flags of `add_flags`, or the cluster environment.
  Returns True when this is a multi-process run."""
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError("--coordinator_address, --num_processes and --process_id go "
                             "together: give all three or none")
    if not 0 <= args.process_id < args.num_processes:
      raise DistributedError(f"--process_id {args.process_id} is not in [0, "
                             f"{args.num_processes})")
    if args.process_id > 0:
      wait_for_coordinator(args.coordinator_address, args.distributed_timeout)
    kwargs = dict(coordinator_address=args.coordinator_address,
                  num_processes=args.num_processes, process_id=args.process_id)
    where = f"coordinator {args.coordinator_address}"
  elif cluster_detected(environ):
    kwargs, where = {}, "the cluster's coordinator"
  else:
    return False
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=args.distributed_timeout)
  except Exception as e:  # jax raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f"could not join {where} within {args.distributed_timeout} s: "
                           f"{first[:200]}") from None
  return True
