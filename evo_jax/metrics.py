"""Where a run's numbers go: WORKDIR/metrics.jsonl (one JSON object per logged step, for
tables and tests) and TensorBoard event files under WORKDIR/tb (for people watching)."""
import json

import numpy as np

from evo_jax import paths


class MetricsWriter:
  """Appends to a run's metrics. A run that starts at `start_step` (the checkpoint it resumed
  from, or 0) first drops what an earlier, interrupted run logged after that step, in
  metrics.jsonl and in TensorBoard (its purge_step), so that each step is logged once."""

  def __init__(self, workdir, start_step=0, enabled=True):
    self.enabled = enabled
    if not enabled:
      return
    self.path = paths.path(workdir) / "metrics.jsonl"
    drop_records_after(self.path, start_step)
    self._log = paths.LineLog(self.path)
    from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
    self._tb = SummaryWriter(str(paths.path(workdir) / "tb"), purge_step=start_step + 1)

  def write(self, step, record):
    """record: {name: number or list of numbers}; lists go to TensorBoard element-wise."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    self._log.append(json.dumps(record))
    for name, value in record.items():
      if name == "step" or isinstance(value, str):
        continue
      if isinstance(value, list):
        for i, v in enumerate(value):
          if v is not None:
            self._tb.add_scalar(f"{name}/{i}", v, step)
      elif value is not None:
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._log.close()
      self._tb.close()


def _plain(value):
  if isinstance(value, str):
    return value
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim == 0:
    v = float(arr)
    return v if np.isfinite(v) else None
  return [float(v) if np.isfinite(v) else None for v in arr.tolist()]


def drop_records_after(path, step):
  """Rewrites metrics.jsonl (whole, atomically) without its records past `step`, and without
  a last line cut short by a kill."""
  path = paths.path(path)
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  if len(kept) == len(lines):
    return
  paths.write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(workdir):
  text = (paths.path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
