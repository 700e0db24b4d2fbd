"""A real multi-process run: 2 processes x 4 simulated CPU devices joined by jax.distributed
over localhost, started with launch/local.py as a user would, on prepared data (python -m
evo_jax.prepare). Each process reads its own rows; the checkpoint restores in one process onto
other meshes; a run preempted (SIGTERM to one process) and then killed mid-way resumes and
reproduces the uninterrupted one; the run resumes on 1 process, and that on 2 again."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, SMALL_MODEL
from evo_jax import cli
from evo_jax import metrics
from evo_jax import run as run_lib
from evo_jax import sharding
from evo_jax import train

STEPS = 12
LOG_EVERY = 2      # each log step also measures the bound and the AR path: not every step


def command(workdir, tokenizer, corpus, processes=2):
  settings = dict(
      **{f"model.{k}": v for k, v in dict(SMALL_MODEL, vocab_size=512).items()},
      **{"data.tokenizer": tokenizer, "data.corpus": corpus, "data.seq_len": 32,
         "data.batch_size": 8,
         "mesh.fsdp": 2, "optim.warmup_steps": 2, "optim.decay_steps": STEPS,
         "train.steps": STEPS, "train.log_every": LOG_EVERY, "train.eval_every": STEPS,
         "train.ckpt_every": 3, "train.keep_checkpoints": 10, "train.eval_batches": 1,
         "train.samples": 0, "train.record_batches": True, "bound.windows": 1})
  return ([sys.executable, str(REPO / "launch" / "local.py"), "--processes", str(processes),
           "--devices_per_process", str(8 // processes), "--", "--config",
           str(REPO / "configs" / "tiny.py"),
           "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in settings.items()])


def launch(cmd, **kwargs):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True, **kwargs)


def losses(workdir):
  if not (workdir / "metrics.jsonl").exists():
    return {}
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if r["split"] == "train"}


def last_logged(workdir):
  """The last train step in metrics.jsonl so far (0 if none, or while a line is half written)."""
  try:
    return max(losses(workdir), default=0)
  except ValueError:
    return 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_tokenizer):
  """The top-level modules of the standard library, prepared."""
  from evo_jax import prepare
  out = tmp_path_factory.mktemp("mp") / "prepared"
  prepare.prepare(prepare.parse_args([
      "--input", f"{os.path.dirname(os.__file__)}/*.py", "--tokenizer", stdlib_tokenizer,
      "--out", str(out), "--shards", "2", "--workers", "2"]), log=lambda _: None)
  return str(out)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, stdlib_tokenizer, corpus):
  workdir = tmp_path_factory.mktemp("mp") / "straight"
  proc = launch(command(workdir, stdlib_tokenizer, corpus))
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  assert "[0]" in out and "[1]" in out
  return workdir


def test_each_process_reads_its_own_rows(straight_run):
  """Per step, the two processes' rows are disjoint and together make the global batch."""
  read = [[json.loads(line) for line in open(straight_run / "batches" / f"process_{i}.jsonl")]
          for i in range(2)]
  assert [r["step"] for r in read[0]] == [r["step"] for r in read[1]] == list(range(STEPS))
  for a, b in zip(*read):
    assert len(a["rows"]) == len(b["rows"]) == 4          # 8 rows split over 2 processes
    assert not set(a["rows"]) & set(b["rows"])
  everything = [row for proc in read for r in proc for row in r["rows"]]
  assert len(set(everything)) > 0.9 * len(everything)       # no process re-reads the other's data


def saved_params(workdir, mesh_cfg, devices):
  """Parameters of the latest checkpoint, restored in this single process onto a mesh."""
  return run_lib.load_run(str(workdir), sharding.make_mesh(mesh_cfg, devices)).params


def training_process(workdir, index):
  """The pid of process `index` of the run in workdir (a child of the launcher)."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    except OSError:
      continue
    if str(workdir).encode() in args and f"--process_id={index}".encode() in args:
      return int(pid)
  raise AssertionError(f"process {index} of {workdir} not found")


def wait_for_step(proc, workdir, step):
  deadline = time.monotonic() + 900
  while last_logged(workdir) < step and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)


def test_preempted_and_killed_run_resumes_and_restores_on_other_meshes(
    straight_run, stdlib_tokenizer, corpus, tmp_path):
  """SIGTERM to one process (a preemption notice): both save at the step JAX's preemption sync
  point agrees on and exit 0. The rerun is then killed (kill -9, no notice) after step 3 past
  it is logged. The third run resumes and logs what the uninterrupted run logged."""
  workdir = tmp_path / "killed"
  cmd = command(workdir, stdlib_tokenizer, corpus)
  proc = launch(cmd)
  wait_for_step(proc, workdir, 4)
  os.kill(training_process(workdir, 1), signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = [int(line.split("SIGTERM at step ")[1].split(":")[0]) for line in out.splitlines()
           if "SIGTERM at step " in line]
  assert len(saved) == 2 and saved[0] == saved[1] < STEPS, out[-3000:]   # both, one step
  preempted_at = saved[0]
  assert (workdir / "checkpoints" / str(preempted_at)).is_dir()

  proc = launch(cmd)
  wait_for_step(proc, workdir, preempted_at + 3)   # a log step past the next checkpoint
  proc.send_signal(signal.SIGTERM)       # the launcher SIGKILLs both training processes
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode != 0, "the run finished before it could be killed"
  killed_at = max(losses(workdir))
  assert killed_at < STEPS, out[-2000:]

  proc = launch(cmd)
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from" in out
  a, b = losses(straight_run), losses(workdir)
  logged = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  assert sorted(a) == sorted(b) == logged
  # Each step once: the records the killed run wrote after its last checkpoint were dropped.
  assert [r["step"] for r in metrics.read_metrics(workdir) if r["split"] == "train"] == logged
  for step in logged:
    assert a[step] == b[step], step

  # Saved by 2 processes on a (data 4, fsdp 2) mesh; restored here on other meshes.
  reference = saved_params(straight_run, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  for mesh_cfg in (dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)):
    for x, y in zip(jax.tree.leaves(reference),
                    jax.tree.leaves(saved_params(workdir, mesh_cfg, jax.devices()))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))



def test_resumes_on_one_process_and_then_on_two(straight_run, stdlib_tokenizer, corpus,
                                                 tmp_path):
  """The 2-process run's checkpoint at step 6, resumed on 1 process (this one) to step 9, and
  that on 2 processes to step 12: every step reads the global batch, and no row is read twice
  (evo_jax/prepared.py: no document twice, none skipped; tests/test_prepared.py checks it
  token by token)."""
  workdir = tmp_path / "elastic"
  shutil.copytree(straight_run, workdir)
  for later in ("9", "12"):
    shutil.rmtree(workdir / "checkpoints" / later)
  shutil.rmtree(workdir / "batches")
  # 1 process: this one, on its 8 simulated devices (the mesh of the 2 x 4 run).
  cmd = command(workdir, stdlib_tokenizer, corpus) + ["--config.train.steps=9"]
  cfg = cli.load_config_file(cmd[cmd.index("--config") + 1])
  cli.apply_overrides(cfg, [arg for arg in cmd if arg.startswith("--config.")])
  log = []
  train.Trainer(cfg, str(workdir)).run(log=log.append)
  assert any("saved by 2 processes and continues on 1" in line for line in log), log
  proc = launch(command(workdir, stdlib_tokenizer, corpus))
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  assert "saved by 1 process and continues on 2" in out, out[-3000:]
  per_step = {}
  for run in (straight_run, workdir):
    for i in range(2):
      for line in open(run / "batches" / f"process_{i}.jsonl"):
        record = json.loads(line)
        if (record["step"] < 6) == (run == straight_run):
          per_step.setdefault(record["step"], []).extend(record["rows"])
  assert sorted(per_step) == list(range(STEPS))
  assert all(len(rows) == 8 for rows in per_step.values())
  everything = [row for rows in per_step.values() for row in rows]
  assert len(set(everything)) == len(everything)
