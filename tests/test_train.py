"""Training end to end on the real default corpus: the loss falls, checkpoints restore exactly,
and a stopped and resumed run reproduces an uninterrupted one."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import as_bucket, one_device, REPO
from evo_jax import checkpoint
from evo_jax import cli
from evo_jax import metrics
from evo_jax import model as model_lib
from evo_jax import sharding
from evo_jax import state as state_lib
from evo_jax import train


def train_records(workdir):
  return {r["step"]: r for r in metrics.read_metrics(workdir) if r["split"] == "train"}


def run(cfg, workdir):
  trainer = train.Trainer(cfg, str(workdir), devices=one_device())
  state = trainer.run(log=lambda *_: None)
  return trainer, state


def test_tiny_config_loss_falls_on_the_standard_library(stdlib_tokenizer, tmp_path):
  """configs/tiny.py's model and objective in a short run (20 steps of 8 x 64 tokens, a quicker
  warm-up and higher peak learning rate), with the session's small tokenizer."""
  cfg = cli.load_config_file(str(REPO / "configs/tiny.py"))
  cli.apply_overrides(cfg, [
      f"--config.data.tokenizer={stdlib_tokenizer}", "--config.model.vocab_size=512",
      "--config.data.batch_size=8", "--config.data.seq_len=64", "--config.train.steps=20",
      "--config.train.log_every=5", "--config.train.eval_every=20",
      "--config.train.ckpt_every=20", "--config.train.eval_batches=2",
      "--config.optim.warmup_steps=5", "--config.optim.lr=3e-3"])
  run(cfg, tmp_path)
  records = train_records(tmp_path)
  first, last = records[5], records[20]
  assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])
  assert last["ar_nll"] < first["ar_nll"]
  heldout = [r for r in metrics.read_metrics(tmp_path) if r["split"] == "heldout"]
  assert [r["step"] for r in heldout] == [20]
  assert heldout[0]["ar_ppl"] < 512                 # better than uniform over the vocabulary
  assert last["tokens_per_sec"] > 0 and last["tflops_per_device"] > 0
  assert last["mfu"] is None                        # a CPU has no bf16 peak to divide by
  for key in ("loss", "bound_wL_bpt", "bound_w1_bpt", "ar_nll", "ce_by_t", "time_abs_err", "lr",
              "tokens_per_sec", "tflops_per_device", "mfu", "clean_ar_nll"):
    assert key in last, key
  assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())


def test_resume_reproduces_an_uninterrupted_run(run_cfg, tmp_path, monkeypatch):
  """SIGTERM (a preemption notice) while step 2 is logged: the run saves step 2, between its
  periodic checkpoints (every 3), and stops; the same command run again logs what the
  uninterrupted run logged, each step once. The stopped run's workdir is handled as a bucket's
  (rewritten, never appended to: evo_jax/paths.py)."""
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  _, state = run(run_cfg, straight)
  as_bucket(monkeypatch, stopped)

  def preempt_at_step_2(line):
    if line.startswith("step      2/"):
      os.kill(os.getpid(), signal.SIGTERM)

  trainer = train.Trainer(run_cfg, str(stopped), devices=one_device())
  trainer.run(log=preempt_at_step_2)
  assert trainer.stopped_by == signal.SIGTERM
  assert checkpoint.RunCheckpoints(str(stopped)).manager.all_steps() == [2]
  run(run_cfg, stopped)

  a, b = train_records(straight), train_records(stopped)
  assert sorted(a) == sorted(b) == [2, 4, 6]
  for step in (2, 4, 6):
    for key in a[step]:
      if key not in train.TIMING_FIELDS:
        assert a[step][key] == b[step][key], (step, key)
  heldout_at_6 = lambda d: [r for r in metrics.read_metrics(d)
                            if r["split"] == "heldout" and r["step"] == 6]
  assert len(heldout_at_6(straight)) == 1
  assert heldout_at_6(straight) == heldout_at_6(stopped)

  # The checkpoint restores to identical parameters and optimizer state, and the restored data
  # iterator yields the batch that comes next.
  fresh = train.Trainer(run_cfg, str(straight), devices=one_device())
  ckpts = checkpoint.RunCheckpoints(str(straight))
  data_iter = iter(fresh.dataset("train"))
  restored = ckpts.restore(6, fresh.abstract_state, data_iter)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  reference = iter(fresh.dataset("train"))
  for _ in range(6):
    next(reference)
  expected, got = next(reference), next(data_iter)
  for key in expected:
    np.testing.assert_array_equal(expected[key], got[key])


def sharded_step(cfg, batch, mesh_sizes, devices):
  """One step of a fresh model as the Trainer runs it (train.build_step: jit_train_step with
  its shardings, donation and activation constraints) on a mesh: (loss, the new running CE
  per t bin (None unless progression.t_base is adaptive), new params)."""
  cfg.mesh.update(data=mesh_sizes[0], fsdp=mesh_sizes[1], tensor=mesh_sizes[2])
  cfg.data.batch_size = len(batch["tokens"])
  step = train.build_step(cfg, devices)
  state = step.init(jax.random.key(0))
  new_state, aux = step.fn(state, sharding.global_batch(batch, step.mesh))
  return float(aux["loss"]), jax.device_get(getattr(new_state, "ce_by_bin", None)), \
      jax.device_get(new_state.params)


@pytest.mark.parametrize("layout", ["blocks", "scanned_chunked"])
def test_sharded_steps_equal_single_device(small_cfg, layout):
  """The same step on one device and on an 8-device mesh (data x fsdp x tensor = 2 x 2 x 2),
  with activations constrained by the logical rules: the same loss and the same update, to
  float tolerance. Also for scanned layers with chunked attention (the large configs' layout).
  Each axis splits in two, so the data split, the FSDP gathers and the tensor-parallel
  reductions all happen in the one step."""
  assert len(jax.devices()) == 8, "conftest simulates 8 CPU devices"
  if layout == "scanned_chunked":   # ... with the adaptive t distribution's state, too
    small_cfg.model.update(scan_layers=True, attention="chunked", attention_chunk=8)
    small_cfg.progression.t_base = "adaptive"
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(4, 64, (8, 16)).astype(np.int32),
           "segment_ids": np.repeat(np.asarray([[1] * 10 + [2] * 6]), 8, 0).astype(np.int32),
           "positions": np.repeat(np.asarray([list(range(10)) + list(range(6))]), 8, 0)
                        .astype(np.int32)}
  loss1, bins1, params1 = sharded_step(small_cfg, batch, (1, 1, 1), jax.devices()[:1])
  loss8, bins8, params8 = sharded_step(small_cfg, batch, (2, 2, 2), jax.devices())
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  if layout == "scanned_chunked":   # the running CE of the bins the batch's t fell in
    assert np.sum(bins1 > 0) > 1
    np.testing.assert_allclose(bins8, bins1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_adaptive_state_saves_and_restores(small_cfg, tmp_path):
  """With progression.t_base = adaptive the train state also holds the running CE per t bin:
  it is saved and restored with the rest (so a resumed run draws the t an uninterrupted one
  would), and a run without the option keeps the plain state."""
  small_cfg.progression.t_base = "adaptive"
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  layout = state_lib.state_layout(small_cfg, mesh)
  state = layout.init(jax.random.key(0))
  state = state.replace(ce_by_bin=jnp.linspace(0.0, 5.0, small_cfg.progression.adaptive_bins))
  ckpts = checkpoint.RunCheckpoints(str(tmp_path), async_save=False)
  ckpts.save(1, state, None, small_cfg.to_dict())
  restored = ckpts.restore(1, layout.abstract)
  ckpts.close()
  assert isinstance(restored, state_lib.AdaptiveTrainState)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  small_cfg.progression.t_base = "uniform"
  assert type(state_lib.state_layout(small_cfg, mesh).abstract) is state_lib.TrainState


def test_gradient_accumulation_equals_one_big_step(small_cfg):
  """Four micro-batches of 2 give the update of one batch of 8 (same draws, same counts)."""
  model = model_lib.EvoTransformer(model_lib.from_config(small_cfg.model))
  tx = state_lib.make_optimizer(small_cfg.optim, 10)
  state = state_lib.init_state(model, tx, jax.random.key(0))
  rng = np.random.default_rng(0)
  seg = np.asarray([[1] * 10 + [2] * 4 + [0] * 2] * 4 + [[1] * 16] * 4, np.int32)
  batch = {"tokens": rng.integers(4, 64, (8, 16)).astype(np.int32), "segment_ids": seg,
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
  out = []
  for accum in (1, 4):
    small_cfg.train.grad_accum_steps = accum
    out.append(jax.jit(train.make_train_step(model, tx, small_cfg))(state, batch))
  (s1, a1), (s4, a4) = out
  for key in ("loss", "clean_ar_nll", "ce_sum", "tokens", "ce_by_t_count", "grad_norm"):
    np.testing.assert_allclose(np.asarray(a4[key]), np.asarray(a1[key]), rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
