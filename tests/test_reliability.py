"""Faults a run must survive (docs/reliability.md), each injected for real: a non-finite step
(a batch with a token id outside the vocabulary, whose embedding lookup is NaN), SIGTERM and
SIGINT, damaged checkpoints, a second trainer on a workdir, a swapped tokenizer, a failed
save."""
import copy
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import one_device
from evo_jax import checkpoint
from evo_jax import data
from evo_jax import guards
from evo_jax import metrics
from evo_jax import run as run_lib
from evo_jax import train


class FaultyTrainer(train.Trainer):
  """Feeds, at the steps in `bad_steps` (1-based, as logged), a batch whose first token is
  outside the vocabulary."""
  bad_steps = ()

  def step(self, state, local_batch):
    if int(state.step) + 1 in self.bad_steps:
      tokens = np.array(local_batch["tokens"])
      tokens[0, 0] = self.cfg.model.vocab_size + 5
      local_batch = dict(local_batch, tokens=tokens)
    return super().step(state, local_batch)


def finite(tree):
  return not guards.nonfinite_leaves(tree)


def test_a_diverging_run_stops_at_the_step_with_its_checkpoints_finite(run_cfg, tmp_path):
  run_cfg.optim.update(lr=1e3, warmup_steps=1)     # non-finite from step 3
  run_cfg.train.update(steps=6, ckpt_every=1, log_every=3, eval_every=100)
  with pytest.raises(guards.NonfiniteError) as e:
    train.Trainer(run_cfg, str(tmp_path), devices=one_device()).run(log=lambda *_: None)
  assert str(e.value).startswith("step 3 is not finite (loss ")
  assert "the last finite checkpoint is step 2" in str(e.value)
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), async_save=False)
  assert ckpts.manager.all_steps() == [1, 2]      # nothing saved past the fault
  ckpts.close()
  assert finite(run_lib.load_run(str(tmp_path)).params)


def test_skip_leaves_the_state_of_a_nonfinite_step_and_stops_past_the_limit(run_cfg, tmp_path):
  """A batch with an out-of-vocabulary token at step 5 under on_nonfinite=skip: the step's
  update is dropped exactly, the run finishes finite, and the skip is logged."""
  run_cfg.train.update(steps=6, ckpt_every=3, log_every=3, eval_every=100,
                       on_nonfinite="skip", nonfinite_skip_limit=1)
  seen = {}

  class Watched(FaultyTrainer):
    def step(self, state, local_batch):
      watch = int(state.step) + 1 in self.bad_steps
      if watch:
        seen["before"] = jax.device_get(state)      # before the step donates it
      new, aux = super().step(state, local_batch)
      if watch:
        seen["after"] = jax.device_get(new)
      return new, aux

  trainer = Watched(run_cfg, str(tmp_path), devices=one_device())
  trainer.bad_steps = (5,)
  state = trainer.run(log=lambda *_: None)
  assert int(state.step) == 6 and finite(state.params)
  before, after = seen["before"], seen["after"]
  assert int(after.step) == int(before.step) + 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)                 # the update was skipped exactly
  logged = [r for r in metrics.read_metrics(tmp_path) if r["split"] == "train"]
  assert [r["nonfinite_steps"] for r in logged] == [0, 1]

  # More skips than the limit stop the run; the guard's count is the device's.
  guard = guards.NonfiniteGuard("skip", limit=1)
  for step, finite_step in enumerate([True, False, True, False], start=1):
    guard.update(dict(finite=jnp.asarray(finite_step), loss=jnp.float32(np.nan),
                      grad_norm=jnp.float32(1.0)), step)
    if step < 4:
      guard.check(step, last_checkpoint=None)
  with pytest.raises(guards.NonfiniteError, match=r"2 steps were not finite \(the first: step 2"):
    guard.check(4, last_checkpoint=3)


def one_device_mesh():
  from evo_jax import sharding
  return sharding.make_mesh(dict(data=1), one_device())


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, stdlib_tokenizer):
  """A run of 6 steps (checkpoints every 3) that gets Ctrl-C while step 2 is logged, and is
  rerun: (its workdir, the config, the first run's Trainer, its final state, the log lines of
  both runs, the SIGINT handler before)."""
  from conftest import small_run_config
  cfg = small_run_config(stdlib_tokenizer, steps=6)
  cfg.train.update(log_every=2, ckpt_every=3, eval_every=100)
  workdir = str(tmp_path_factory.mktemp("interrupted"))
  lines = ([], [])

  def log(line):
    lines[0].append(line)
    if line.startswith("step      2/"):
      os.kill(os.getpid(), signal.SIGINT)

  before = signal.getsignal(signal.SIGINT)
  trainer = train.Trainer(cfg, workdir, devices=one_device())
  state = trainer.run(log=log)
  step_after_signal = int(state.step)
  state = train.Trainer(cfg, workdir, devices=one_device()).run(log=lines[1].append)
  return workdir, cfg, trainer, step_after_signal, state, lines, before


def test_sigint_saves_at_the_next_step_and_the_rerun_resumes(interrupted_run):
  """Ctrl-C while step 2 is logged: the run saves step 2 (checkpoints every 3) and returns;
  the rerun resumes there and logs each step once. (SIGTERM: test_train.py's resume test.)"""
  workdir, _, trainer, step_after_signal, state, (first, second), before = interrupted_run
  assert trainer.stopped_by == signal.SIGINT and step_after_signal == 2
  assert first[-1].startswith("SIGINT at step 2: saved ") and "resume" in first[-1]
  assert guards.EXIT_CODES[signal.SIGINT] == 130 and guards.EXIT_CODES[signal.SIGTERM] == 0
  assert signal.getsignal(signal.SIGINT) == before          # the handler is the run's only
  assert any("resumed from" in line and line.endswith("/2") for line in second)
  assert int(state.step) == 6
  steps = [r["step"] for r in metrics.read_metrics(workdir) if r["split"] == "train"]
  assert steps == [2, 4, 6]


def damage(step_dir, how):
  state = os.path.join(step_dir, "state")
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(state, "d")) for n in ns]
  if how == "truncated":
    with open(max(files, key=os.path.getsize), "r+b") as f:
      f.truncate(100)
  elif how == "no manifest":
    os.remove(os.path.join(state, "manifest.ocdbt"))
  elif how == "flipped":
    path = max(files, key=os.path.getsize)
    raw = bytearray(open(path, "rb").read())
    for i in range(64):
      raw[len(raw) // 2 + i] ^= 0xFF
    open(path, "wb").write(bytes(raw))
  elif how == "fingerprint":   # the arrays read back fine but are not what was saved
    os.remove(os.path.join(step_dir, checkpoint.FILES_NAME))
    meta = os.path.join(step_dir, "fingerprint", "metadata")
    saved = json.load(open(meta))
    first = sorted(saved)[0]
    saved[first] = "0" * 16
    json.dump(saved, open(meta, "w"))


def test_a_damaged_checkpoint_is_named_and_training_falls_back(interrupted_run, tmp_path,
                                                               capsys):
  from evo_jax import sample
  from conftest import one_line_error
  run_dir, run_cfg = interrupted_run[0], copy.deepcopy(interrupted_run[1])
  good = str(tmp_path / "good")
  shutil.copytree(run_dir, good)
  for how in ("truncated", "no manifest", "flipped", "fingerprint"):
    work = str(tmp_path / how.replace(" ", "_"))
    shutil.copytree(good, work)
    damage(os.path.join(work, "checkpoints", "6"), how)
    line = one_line_error(capsys, sample.main, ["--workdir", work, "--prompt", "def "],
                          f"checkpoint {work}/checkpoints/6 is damaged")
    assert len(line) < 400, line
  # Training warns, moves the damaged one aside and resumes from the newest intact one.
  work = str(tmp_path / "truncated")
  run_cfg.train.steps = 9
  lines = []
  state = train.Trainer(run_cfg, work, devices=one_device()).run(log=lines.append)
  assert lines[0].startswith(f"warning: checkpoint {work}/checkpoints/6 is damaged")
  assert lines[1] == f"resumed from {work}/checkpoints/3" and int(state.step) == 9
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["6", "9", "damaged-6"]
  assert finite(run_lib.load_run(work).params)


def test_sample_refuses_a_checkpoint_with_nonfinite_parameters(tiny_run, tmp_path, capsys):
  from evo_jax import sample
  from conftest import one_line_error
  work = str(tmp_path / "run")
  shutil.copytree(tiny_run, work)
  run = run_lib.load_run(work)
  ckpts = checkpoint.RunCheckpoints(work, async_save=False)
  abstract = train.state_lib.state_layout(run.cfg, one_device_mesh()).abstract
  state = ckpts.restore(run.step, abstract)
  params = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(np.nan), state.params)
  ckpts.save(run.step + 1, state.replace(params=params), None, run.cfg.to_dict())
  ckpts.close()
  one_line_error(capsys, sample.main, ["--workdir", work, "--prompt", "def "],
                 f"checkpoints/{run.step + 1} has non-finite parameters")


def test_a_second_trainer_is_refused_and_a_stale_lock_taken_over(run_cfg, tmp_path):
  lock_path = tmp_path / guards.LOCK_FILE
  with guards.WorkdirLock(str(tmp_path)):
    held = json.load(open(lock_path))
    assert held["pid"] == os.getpid()
    with pytest.raises(guards.WorkdirLockedError, match=f"pid {os.getpid()} on"):
      train.Trainer(run_cfg, str(tmp_path), devices=one_device()).run(log=lambda *_: None)
  assert not lock_path.exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  lock_path.write_text(json.dumps(dict(held, pid=int(dead))))
  with guards.WorkdirLock(str(tmp_path)) as lock:
    assert lock.took_over["pid"] == int(dead)
    assert json.load(open(lock_path))["pid"] == os.getpid()


def test_a_swapped_tokenizer_is_refused(tiny_run, tmp_path, capsys):
  from evo_jax import sample
  from conftest import one_line_error
  work = str(tmp_path / "run")
  shutil.copytree(tiny_run, work)
  cfg = run_lib.read_run_config(work)
  other = str(tmp_path / "other.model")   # the same size, trained on less of the text
  data.train_tokenizer(other, "", cfg.model.vocab_size, 0.05, max_training_chars=200_000)
  assert data.load_tokenizer(other).vocab_size == cfg.model.vocab_size
  capsys.readouterr()
  with open(os.path.join(work, data.TOKENIZER_FINGERPRINT)) as f:
    recorded = f.read().split()[0]
  assert recorded == data.file_sha256(cfg.data.tokenizer)
  cfg_path = os.path.join(work, checkpoint.CONFIG_FILE)
  saved = json.load(open(cfg_path))
  saved["data"]["tokenizer"] = other
  json.dump(saved, open(cfg_path, "w"))
  one_line_error(capsys, sample.main, ["--workdir", work, "--prompt", "def "],
                 f"tokenizer {other} is not the one the run in {work} was trained with")


def test_a_failed_save_is_one_line_and_keeps_what_was_saved(run_cfg, tmp_path, capfd,
                                                            monkeypatch):
  """After the first checkpoint (step 2), a file-size limit (RLIMIT_FSIZE, the soft limit only,
  restored after) makes the next checkpoint's array file fail to write, as a full disk does:
  the run ends with one CheckpointError line naming the folder and the cause (the command
  prints it as its `error:` line), nothing else reaches stderr, and checkpoint 2 restores
  intact."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  save = checkpoint.RunCheckpoints.save

  def save_with_a_full_disk(self, step, *args):
    if step > 2:           # the disk fills up once checkpoint 2 is written
      self.wait()
      resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    return save(self, step, *args)

  monkeypatch.setattr(checkpoint.RunCheckpoints, "save", save_with_a_full_disk)
  run_cfg.train.update(steps=4, ckpt_every=2)
  capfd.readouterr()
  try:
    with pytest.raises(checkpoint.CheckpointError) as e:
      train.Trainer(run_cfg, str(tmp_path), devices=one_device()).run(log=lambda *_: None)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
  message = str(e.value)
  assert message.startswith(f"cannot save a checkpoint in {tmp_path}/checkpoints: ")
  assert "OUT_OF_RANGE" in message and "\n" not in message
  time.sleep(1)                    # TensorStore's late completions would print by now
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  assert run_lib.load_run(str(tmp_path)).step == 2
