"""What keeps a training run whole (docs/reliability.md): the non-finite guard, the preemption
handler and the one-trainer-per-workdir lock. train.py uses all three."""
import json
import os
import signal
import socket
import time

import jax
import jax.numpy as jnp

from evo_jax import paths
from evo_jax.errors import ConfigError, UserError

ON_NONFINITE = ("stop", "skip")


class NonfiniteError(UserError):
  pass


class WorkdirLockedError(UserError):
  pass


# ---------------------------------------------------------------------------------------------
# The non-finite guard
# ---------------------------------------------------------------------------------------------

def check_settings(train_cfg):
  """One-line errors for the guard's settings (train.on_nonfinite, nonfinite_skip_limit)."""
  if train_cfg.on_nonfinite not in ON_NONFINITE:
    raise ConfigError(f"train.on_nonfinite must be one of {ON_NONFINITE}, got "
                      f"{train_cfg.on_nonfinite!r}")
  if train_cfg.nonfinite_skip_limit < 0:
    raise ConfigError(f"train.nonfinite_skip_limit must be >= 0, got "
                      f"{train_cfg.nonfinite_skip_limit}")


def keep_if_finite(finite, new_tree, old_tree):
  """new_tree where `finite` (a scalar bool), else old_tree: a skipped update."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_tree, old_tree)


@jax.jit
def _track(seen, finite, step, loss, grad_norm):
  bad = ~finite
  first = seen["first_step"] < 0
  pick = lambda new, old: jnp.where(bad & first, new, old)
  return dict(count=seen["count"] + bad.astype(jnp.int32),
              first_step=pick(step, seen["first_step"]),
              first_loss=pick(loss, seen["first_loss"]),
              first_grad_norm=pick(grad_norm, seen["first_grad_norm"]))


class NonfiniteGuard:
  """Counts the steps whose loss or gradient norm is not finite without stalling the device:
  `update` dispatches a tiny jitted op on device values, and only `check` (called where the
  loop reads the device anyway: at log steps, before a save, at the end) brings it to the host.

  on_nonfinite=stop: the first non-finite step stops the run (its state is not saved); skip:
  the train step keeps the old state for such a step (train.make_train_step), up to `limit`
  skipped steps in one process's run."""

  def __init__(self, mode, limit):
    self.mode, self.limit = mode, limit
    self.seen = dict(count=jnp.zeros((), jnp.int32), first_step=jnp.full((), -1, jnp.int32),
                     first_loss=jnp.zeros(()), first_grad_norm=jnp.zeros(()))

  def update(self, aux, step):
    self.seen = _track(self.seen, aux["finite"], jnp.int32(step), aux["loss"], aux["grad_norm"])

  def skipped(self):
    return int(jax.device_get(self.seen["count"]))

  def check(self, step, last_checkpoint):
    """Raises NonfiniteError when the run must stop at `step` (nothing of it is saved)."""
    seen = jax.device_get(self.seen)
    count = int(seen["count"])
    if count == 0 or (self.mode == "skip" and count <= self.limit):
      return
    where = (f"the last finite checkpoint is step {last_checkpoint} (rerun to resume from it"
             if last_checkpoint is not None else "no checkpoint was saved (rerun to start again")
    what = (f"loss {float(seen['first_loss']):.4g}, gradient norm "
            f"{float(seen['first_grad_norm']):.4g}")
    if self.mode == "stop":
      raise NonfiniteError(
          f"step {int(seen['first_step'])} is not finite ({what}); the run stopped at step "
          f"{step} without saving it; {where}, e.g. with a lower optim.lr, or with "
          f"--config.train.on_nonfinite=skip)")
    raise NonfiniteError(
        f"{count} steps were not finite (the first: step {int(seen['first_step'])}, {what}), "
        f"more than train.nonfinite_skip_limit={self.limit}; the run stopped at step {step} "
        f"without saving it; {where})")


def nonfinite_leaves(params):
  """The names of the parameter arrays that hold a NaN or an infinity."""
  flags = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda x: ~jnp.all(jnp.isfinite(x)), params))[0]
  return [jax.tree_util.keystr(path) for path, bad in jax.device_get(flags) if bad]


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM and SIGINT save at the next step boundary
# ---------------------------------------------------------------------------------------------

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class Preemption:
  """While active, SIGTERM and SIGINT set a flag instead of killing the process; the training
  loop asks `requested(step)` at every step boundary, saves and exits.

  One process: the flag is read directly. Several processes (jax.distributed): they must stop
  at the same step, so the decision is JAX's preemption sync point, which the coordination
  service reaches on every process at one step once any process got SIGTERM; SIGINT is turned
  into a SIGTERM of this process, so both go the same way."""

  def __init__(self):
    self.received = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      if self._multi and sig == signal.SIGTERM:
        continue          # JAX's preemption notifier handles SIGTERM in a multi-process run
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, sig, frame):
    if self.received is None or sig == signal.SIGINT:
      self.received = signal.Signals(sig)
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step):
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or signal.SIGTERM
        return True
      return False
    return self.received is not None


# ---------------------------------------------------------------------------------------------
# One trainer per workdir
# ---------------------------------------------------------------------------------------------

LOCK_FILE = "trainer.lock"


def pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """WORKDIR/trainer.lock, created exclusively by process 0 and holding its host, pid and start
  time. A lock whose process is gone (same host, pid not running) is stale and taken over; any
  other is a one-line error naming who holds it."""

  def __init__(self, workdir, enabled=True):
    self.path = paths.path(workdir) / LOCK_FILE
    self.enabled = enabled
    self.took_over = None

  def __enter__(self):
    if not self.enabled:
      return self
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    for _ in range(2):
      if paths.create_exclusive(self.path, json.dumps(me)):
        return self
      holder = self._holder()
      if holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
        self.took_over = holder
        self.path.unlink(missing_ok=True)      # stale: its process is gone
        continue
      raise WorkdirLockedError(
          f"{self.path.parent} is in use by another trainer (pid "
          f"{holder.get('pid', '?')} on {holder.get('host', '?')} since "
          f"{holder.get('since', '?')}): use another --workdir, or delete {self.path} if "
          f"that trainer is gone")
    raise WorkdirLockedError(f"cannot take the lock {self.path}")

  def _holder(self):
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}       # being written, or damaged: treated as held by an unknown trainer

  def __exit__(self, *exc):
    if self.enabled:
      self.path.unlink(missing_ok=True)
