"""Where a run's numbers go: WORKDIR/metrics.jsonl (one JSON object per logged step, for
tables and tests) and TensorBoard event files under WORKDIR/tb (for people watching)."""
import json
import os

import numpy as np


class MetricsWriter:
  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    if not enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step, record):
    """record: {name: number or list of numbers}; lists go to TensorBoard element-wise."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
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
      self._file.close()
      self._tb.close()


def _plain(value):
  if isinstance(value, str):
    return value
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim == 0:
    v = float(arr)
    return v if np.isfinite(v) else None
  return [float(v) if np.isfinite(v) else None for v in arr.tolist()]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
