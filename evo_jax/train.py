"""Training: `python -m evo_jax.train --config configs/tiny.py --workdir DIR [--config.x.y=v]`.

Read top to bottom: build the model, optimizer and data from the config; restore the latest
checkpoint in DIR if there is one; run the jitted step; log, evaluate and save periodically;
at the end print the headline numbers and a few samples decoded from the saved checkpoint.
"""
import dataclasses
import hashlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evo_jax import attention
from evo_jax import checkpoint
from evo_jax import cli
from evo_jax import config as config_lib
from evo_jax import data
from evo_jax import distributed
from evo_jax import flops
from evo_jax import guards
from evo_jax import loss as loss_lib
from evo_jax import measure as measure_lib
from evo_jax import metrics as metrics_lib
from evo_jax import model as model_lib
from evo_jax import paths
from evo_jax import progression
from evo_jax import run as run_lib
from evo_jax import sharding
from evo_jax import state as state_lib
from evo_jax.errors import ConfigError


def make_train_step(model, tx, cfg):
  """step(state, batch) -> (state, aux). With train.grad_accum_steps = A > 1 the batch is cut
  into A micro-batches whose gradients are summed in a scan (activation memory of one
  micro-batch); the random draws and the token counts are those of the whole batch, so the
  update equals the one big step up to float rounding."""
  loss_on_draws = loss_lib.make_loss_on_draws(model, cfg)
  grad_fn = jax.value_and_grad(loss_on_draws, has_aux=True)
  base_key = jax.random.key(cfg.seed)
  A = cfg.train.grad_accum_steps

  def gradients(params, batch, draws, counts):
    if A == 1:
      (_, aux), grads = grad_fn(params, batch, draws, counts)
      return grads, aux
    # Strided (rows a, a + A, ...), so each micro-batch spans every data-parallel device.
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // A, A, *x.shape[1:]), 0, 1)
    micro = jax.tree.map(split, (batch, draws))

    def accumulate(total, batch_and_draws):
      (_, aux), grads = grad_fn(params, *batch_and_draws, counts)
      return jax.tree.map(jnp.add, total, (grads, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, aux_shape), grads_shape = jax.eval_shape(lambda: grad_fn(params, *first, counts))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, aux_shape))
    (grads, aux), _ = jax.lax.scan(accumulate, zeros, micro)
    return grads, aux

  adaptive = progression.adaptive_bins(cfg.progression) > 0

  def train_step(state, batch):
    rng = jax.random.fold_in(base_key, state.step)
    density = (progression.adaptive_density(cfg.progression, state.ce_by_bin) if adaptive
               else None)
    draws = loss_lib.sample_draws(rng, cfg, batch, state.step, density)
    grads, aux = gradients(state.params, batch, draws, loss_lib.token_counts(batch))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    aux["finite"] = jnp.isfinite(aux["loss"]) & jnp.isfinite(aux["grad_norm"])
    new = dict(params=params, opt_state=opt_state)
    if adaptive:
      new["ce_by_bin"] = progression.update_bin_ce(
          cfg.progression, state.ce_by_bin, aux.pop("ce_by_bin_sum"), aux.pop("ce_by_bin_count"))
    if cfg.train.on_nonfinite == "skip":   # a non-finite step leaves the state as it was
      new = guards.keep_if_finite(aux["finite"], new, {k: getattr(state, k) for k in new})
    return state.replace(step=state.step + 1, **new), aux

  return train_step


def jit_train_step(model, tx, cfg, mesh, state_sharding):
  """The train step as it runs: sharded state in and out (donated), the batch split over the
  data axes, activations constrained by the logical rules. Shared by the Trainer and by
  ahead-of-time compilation (evo_jax/aot.py)."""
  return sharding.traced_under_rules(
      jax.jit(make_train_step(model, tx, cfg),
              in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
              out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0),
      mesh, sharding.logical_rules(cfg.sharding.rules))


@dataclasses.dataclass
class Step:
  """The train step for a mesh over devices, from shapes only: nothing is allocated, so an 8B
  model is lowered on a laptop. `init` makes the real state, where the devices are real."""
  fn: object            # the jitted step, as the Trainer runs it
  state: object         # abstract sharded train state
  batch: dict           # abstract sharded batch
  mesh: object
  n_params: int
  init: object          # key -> sharded train state


def build_step(cfg, devices) -> Step:
  """The step of `jit_train_step` on a mesh of `devices` with abstract state and batch:
  what ahead-of-time compilation (aot.py) and `bench memory` lower and compile."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch_size(mesh, cfg.data.batch_size, cfg.train.grad_accum_steps)
  layout = state_lib.state_layout(cfg, mesh)
  row = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32,
                             sharding=sharding.batch_sharding(mesh))
  return Step(jit_train_step(layout.model, layout.tx, cfg, mesh, layout.shardings),
              layout.abstract, {"tokens": row, "segment_ids": row, "positions": row}, mesh,
              sum(x.size for x in jax.tree.leaves(layout.abstract.params)), layout.init)


def check_workdir_config(cfg, workdir):
  """Refuses a workdir that holds another config's run."""
  saved = checkpoint.read_config(workdir)
  if saved is not None:
    diff = config_lib.mismatch(saved, cfg)
    if diff:
      name, was, now = diff
      raise ConfigError(f"workdir {workdir} holds a run with another config: {name} is {was!r} "
                        f"there and {now!r} here (use another --workdir)")


class Trainer:
  """Everything a run needs, built from its config; `run()` trains, `evaluate()` measures.
  The mesh spans `devices` (default: every device of the run)."""

  def __init__(self, cfg, workdir, devices=None):
    check_workdir_config(cfg, workdir)
    guards.check_settings(cfg.train)
    model_lib.from_config(cfg.model)         # one-line errors for bad settings, before any work
    attention.check_backend(cfg.model.attention)
    loss_lib.check_config(cfg)
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    self.cfg, self.workdir = cfg, workdir
    self.mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch_size(self.mesh, cfg.data.batch_size, cfg.train.grad_accum_steps)
    self.tokenizer = data.load_or_train_tokenizer(
        cfg.data.tokenizer, workdir, cfg.data.corpus, cfg.model.vocab_size,
        cfg.data.heldout_fraction, cfg.data.text_field)
    data.check_tokenizer(self.tokenizer, workdir)
    # More embedding rows than pieces is fine: HF checkpoints pad their vocabularies.
    if self.tokenizer.vocab_size > cfg.model.vocab_size:
      raise ConfigError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} "
                        f"pieces but model.vocab_size={cfg.model.vocab_size}")
    if cfg.model.attention == "chunked":
      attention.query_chunk(cfg.model.attention_chunk, 2 * cfg.data.seq_len)
    if cfg.model.attention == "block_sparse":   # its blocks must not straddle the two streams
      attention.query_chunk(cfg.model.attention_chunk, cfg.data.seq_len, "data.seq_len")
    layout = state_lib.state_layout(cfg, self.mesh)
    self.model, self.tx = layout.model, layout.tx
    self.state_sharding, self.abstract_state = layout.shardings, layout.abstract
    self.init_state = layout.init        # key -> a fresh state on the mesh
    self.lr = state_lib.learning_rate_fn(cfg.optim, cfg.train.steps)

    repl = sharding.replicated(self.mesh)
    rules = sharding.logical_rules(cfg.sharding.rules)
    batch_sh = sharding.batch_sharding(self.mesh)
    self._step = jit_train_step(self.model, self.tx, cfg, self.mesh, self.state_sharding)
    self._measure = sharding.traced_under_rules(
        jax.jit(measure_lib.make_measure(self.model, cfg),
                in_shardings=(self.state_sharding.params, batch_sh, repl),
                out_shardings=repl), self.mesh, rules)

  def dataset(self, split):
    d = self.cfg.data
    return data.make_dataset(
        d.corpus, split, self.tokenizer, d.seq_len, d.batch_size, seed=self.cfg.seed,
        heldout_fraction=d.heldout_fraction, text_field=d.text_field,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle_rows=d.shuffle_rows, mixture=d.mixture, workers=d.workers)

  def global_batch(self, local):
    return sharding.global_batch(local, self.mesh)

  def step(self, state, local_batch):
    return self._step(state, self.global_batch(local_batch))

  def measure_rng(self, step):
    """The bound's draws at a step (the AR path's noise is fixed: measure.make_measure)."""
    return jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)

  def measure(self, params, local_batch, rng):
    return self._measure(params, self.global_batch(local_batch), rng)

  def evaluate(self, params, batches, step):
    """The bound and AR-path perplexity over the held-out batches."""
    return measure_lib.measure_batches(
        lambda batch, rng: self.measure(params, batch, rng), batches,
        jax.random.fold_in(self.measure_rng(step), 1), self.cfg.bound.windows)

  def run(self, log=print):
    """Trains to train.steps from the latest checkpoint; returns the final state. A SIGTERM or
    SIGINT saves at the next step boundary and returns early (`self.stopped_by` names the
    signal); a non-finite step raises guards.NonfiniteError (train.on_nonfinite)."""
    self.stopped_by = None
    with guards.WorkdirLock(self.workdir, enabled=jax.process_index() == 0) as lock:
      if lock.took_over:
        log(f"took over the lock of a trainer that is gone (pid {lock.took_over.get('pid')})")
      # Recorded only now that every setting has been validated, so that a mistyped first
      # attempt does not leave a config behind that refuses the corrected command. Process 0
      # alone writes it: processes writing the shared workdir's file at once can collide.
      if jax.process_index() == 0:
        checkpoint.write_config(self.workdir, self.cfg.to_dict())
        data.check_tokenizer(self.tokenizer, self.workdir, record=True)
      ckpts = checkpoint.RunCheckpoints(self.workdir, keep=self.cfg.train.keep_checkpoints)
      try:
        with guards.Preemption() as preemption:
          return self._run(ckpts, preemption, log)
      finally:
        ckpts.close()

  def _run(self, ckpts, preemption, log):
    cfg, workdir = self.cfg, self.workdir
    tcfg = cfg.train
    data_iter = iter(self.dataset("train"))
    eval_batches = data.make_eval_batches(
        cfg.data.corpus, self.tokenizer, cfg.data.seq_len, cfg.data.batch_size,
        tcfg.eval_batches, cfg.data.heldout_fraction, cfg.data.text_field,
        process_index=jax.process_index(), process_count=jax.process_count())

    start, state = ckpts.restore_newest_intact(self.abstract_state, data_iter, log)
    if start is None:
      state, start = self.init_state(jax.random.key(cfg.seed)), 0
    elif not ckpts.has_data(start):  # an imported model (evo_jax/convert.py): data starts fresh
      log(f"starting from the weights in {ckpts.directory}/{start}")
    else:
      log(f"resumed from {ckpts.directory}/{start}")
      if getattr(data_iter, "elastic_from", None):
        saved = data_iter.elastic_from
        log(f"the data position was saved by {saved} process{'es' * (saved > 1)} and "
            f"continues on {jax.process_count()}: no document is read twice or skipped")
    last_saved = ckpts.latest_step()
    writer = metrics_lib.MetricsWriter(workdir, start, enabled=jax.process_index() == 0)
    guard = guards.NonfiniteGuard(tcfg.on_nonfinite, tcfg.nonfinite_skip_limit)

    def save(step):
      nonlocal last_saved
      guard.check(step, last_saved)     # never a non-finite state, never rotating a good one out
      ckpts.save(step, state, data_iter, cfg.to_dict())
      last_saved = step

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_flops = flops.model_flops(cfg, n_params)
    peak = flops.peak_flops(jax.devices()[0])
    log(f"{workdir}: {n_params:,} parameters, mesh {dict(self.mesh.shape)}, "
        f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens per step, steps {start} -> "
        f"{tcfg.steps} (the first step compiles)")
    tick, tick_step, tokens_since = time.perf_counter(), start, 0
    try:
      for step in range(start, tcfg.steps):
        batch = next(data_iter)
        if tcfg.record_batches:
          record_rows(workdir, step, batch)
        tokens_since += int(np.sum(batch["segment_ids"] > 0))
        state, aux = self.step(state, batch)
        done = step + 1
        guard.update(aux, done)
        if step == start:  # the first step compiles: keep it out of the throughput
          jax.block_until_ready(aux)
          tick, tick_step, tokens_since = time.perf_counter(), done, 0
        if done % tcfg.log_every == 0 or done == tcfg.steps:
          aux = jax.device_get(aux)
          now = time.perf_counter()
          record = self._train_record(aux, done)
          record["nonfinite_steps"] = guard.skipped()
          sums = self.measure(state.params, batch, self.measure_rng(done))
          record.update(measure_lib.summarize(jax.device_get(sums), cfg.bound.windows))
          record.update(throughput(tokens_since, done - tick_step, now - tick, step_flops, peak))
          record["split"] = "train"
          writer.write(done, record)
          log(status_line(done, tcfg.steps, record, tokens_since / max(done - tick_step, 1)))
          guard.check(done, last_saved)
          tick, tick_step, tokens_since = time.perf_counter(), done, 0
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
          guard.check(done, last_saved)
          ev = self.evaluate(state.params, eval_batches, done)
          writer.write(done, {"split": "heldout", **ev})
          log(f"  held-out @ {done}: AR-path ppl {ev['ar_ppl']:.2f} | clean ppl "
              f"{ev['clean_ar_ppl']:.2f} | " + " | ".join(
                  f"bound(W={measure_lib.window_name(w)}) "
                  f"{ev[f'bound_w{measure_lib.window_name(w)}_bpt']:.4g} bpt"
                  for w in cfg.bound.windows))
          tick = time.perf_counter()  # evaluation time is not training throughput
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
          save(done)
        if preemption.requested(done):
          if last_saved != done:
            save(done)
          ckpts.wait()
          self.stopped_by = preemption.received
          log(f"{preemption.received.name} at step {done}: saved {ckpts.directory}/{done}; "
              f"rerun the same command to resume")
          return state
      ckpts.wait()
    finally:
      writer.close()
    return state

  def _train_record(self, aux, step):
    n = max(float(aux["tokens"]), 1.0)
    counts = np.maximum(aux["ce_by_t_count"], 1)
    ce_by_t = np.where(aux["ce_by_t_count"] > 0, aux["ce_by_t_sum"] / counts, np.nan)
    return {
        "loss": float(aux["loss"]),
        "latent_ce": float(aux["ce_sum"]) / n,
        "ce_by_t": ce_by_t,
        "time_abs_err": float(aux["time_abs_err_sum"]) / n,
        "clean_ar_loss": float(aux["clean_ar_nll"]),
        "grad_norm": float(aux["grad_norm"]),
        "lr": float(self.lr(step - 1)),
    }


# The fields of a train record that time the machine rather than the run (a resumed run logs
# the same record but these).
TIMING_FIELDS = ("tokens_per_sec", "tflops_per_device", "mfu")


def throughput(tokens, steps, seconds, step_flops, peak):
  """Tokens per second, model TFLOP/s per device and MFU (against the chip's bf16 peak; None
  on a CPU) of `steps` steps in `seconds` (none: after the compile step only)."""
  if steps <= 0:
    return dict.fromkeys(TIMING_FIELDS)
  per_device = step_flops * steps / seconds / jax.device_count()
  return {"tokens_per_sec": tokens / seconds, "tflops_per_device": per_device / 1e12,
          "mfu": per_device / peak if peak else None}


def record_rows(workdir, step, local_batch):
  """Appends a hash of every row this process read at `step` to batches/process_<i>.jsonl:
  which host read which data, checkable after the fact."""
  rows = [hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in np.asarray(local_batch["tokens"])]
  log = paths.LineLog(paths.path(workdir) / "batches" / f"process_{jax.process_index()}.jsonl")
  log.append(json.dumps({"step": step, "rows": rows}))
  log.close()


def status_line(step, total, r, tokens_per_step):
  tps = r.get("tokens_per_sec")
  eta = f"eta {(total - step) * tokens_per_step / tps / 60:.1f} min" if tps else ""
  return (f"step {step:>6}/{total} | loss {r['loss']:.3f} | AR-path ppl {r['ar_ppl']:.1f} | "
          f"clean ppl {r['clean_ar_ppl']:.1f} | t-err {r['time_abs_err']:.3f} | "
          f"lr {r['lr']:.1e} | " + (f"{tps:,.0f} tok/s | {eta}" if tps else "")
          + (f" | {r['tflops_per_device']:.3g} TFLOP/s/device" if tps else "")
          + (f" | MFU {r['mfu']:.1%}" if r.get("mfu") else ""))


def train_and_report(cfg, workdir, log=print):
  trainer = Trainer(cfg, workdir)
  trainer.run(log=log)
  if trainer.stopped_by is not None:   # preempted: saved, the report is for a finished run
    sys.exit(guards.EXIT_CODES[trainer.stopped_by])
  if jax.process_index() == 0 and cfg.train.samples > 0:
    run_lib.print_report(workdir, cfg.train.samples, cfg.train.sample_tokens,
                         cfg.train.sample_prompt, log=log)


def main(argv=None):
  with cli.command():
    cfg, args = cli.parse_args(sys.argv[1:] if argv is None else argv, __doc__,
                               extra=distributed.add_flags)
    distributed.initialize(args)
    train_and_report(cfg, args.workdir)


if __name__ == "__main__":
  main()
