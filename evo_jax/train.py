"""Training: `python -m evo_jax.train --config configs/tiny.py --workdir DIR [--config.x.y=v]`.

Read top to bottom: build the model, optimizer and data from the config; restore the latest
checkpoint in DIR if there is one; run the jitted step; log, evaluate and save periodically;
at the end print the headline numbers and a few samples decoded from the saved checkpoint.
"""
import hashlib
import json
import math
import os
import sys
import time
from typing import NamedTuple

import flax
import flax.linen as nn
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
from evo_jax import loss as loss_lib
from evo_jax import metrics as metrics_lib
from evo_jax import model as model_lib
from evo_jax import sharding
from evo_jax.errors import ConfigError

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def learning_rate_fn(ocfg, total_steps):
  decay_steps = ocfg.decay_steps or total_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=ocfg.lr, warmup_steps=ocfg.warmup_steps,
      decay_steps=max(decay_steps, ocfg.warmup_steps + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)


def make_optimizer(ocfg, total_steps):
  """AdamW with warm-up, cosine decay and global-norm clipping; no decay on vectors (norms,
  biases). optim.pretrained_lr_scale != 1 scales the steps of every parameter but the time
  conditioning and time head (model.is_time_param): the learning-rate groups of a model
  adapted from a pretrained AR one, whose backbone moves slower than its new parameters."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(ocfg.clip_norm),
           optax.adamw(learning_rate_fn(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2,
                       weight_decay=ocfg.weight_decay, mask=decay_mask)]
  if ocfg.pretrained_lr_scale != 1.0:
    pretrained = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not model_lib.is_time_param(path), params)
    parts.append(optax.masked(optax.scale(ocfg.pretrained_lr_scale), pretrained))
  return optax.chain(*parts)


def init_params(model, rng, seq_len=8, unbox=True):
  """Fresh float32 parameters. unbox=False keeps flax's logical-axis boxes, from which
  `state_shardings` reads where each array goes."""
  B, L, D = 1, seq_len, model.cfg.d_model
  tokens = jnp.zeros((B, L), jnp.int32)
  variables = model.init(rng, tokens, jnp.zeros((B, L, D)), jnp.zeros((B, L), bool),
                         jnp.zeros((B, L)), jnp.zeros((B, L), jnp.int32),
                         jnp.ones((B, L, L), bool))
  return nn.meta.unbox(variables) if unbox else variables


def init_state(model, tx, rng, unbox=True):
  params = init_params(model, rng, unbox=unbox)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model, tx, mesh, rules):
  """The NamedSharding of every leaf of the train state: the optimizer's moments follow their
  parameters, scalars are replicated."""
  boxed = jax.eval_shape(lambda r: init_state(model, tx, r, unbox=False), jax.random.key(0))
  return sharding.tree_shardings(boxed, mesh, rules)


class StateLayout(NamedTuple):
  """A run's model and optimizer with where its train state lives on a mesh."""
  model: model_lib.EvoTransformer
  tx: optax.GradientTransformation
  shardings: TrainState     # NamedSharding of every leaf
  abstract: TrainState      # ShapeDtypeStructs with those shardings (for restores, lowering)
  init: object              # key -> a fresh state, laid out so


def state_layout(cfg, mesh) -> StateLayout:
  """What the Trainer, checkpoint loading, import and ahead-of-time compilation all build from
  a config: the model, the optimizer and the train state's layout on `mesh`."""
  model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  shardings = state_shardings(model, tx, mesh, sharding.logical_rules(cfg.sharding.rules))
  init = lambda rng: init_state(model, tx, rng)
  abstract = checkpoint.abstract_like(jax.eval_shape(init, jax.random.key(cfg.seed)), shardings)
  return StateLayout(model, tx, shardings, abstract, jax.jit(init, out_shardings=shardings))


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

  def train_step(state, batch):
    rng = jax.random.fold_in(base_key, state.step)
    draws = loss_lib.sample_draws(rng, cfg, batch, state.step)
    grads, aux = gradients(state.params, batch, draws, loss_lib.token_counts(batch))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), aux

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


def make_measure(model, cfg):
  """measure(params, batch, rng) -> sums for the bound (each W in bound.windows) and the
  AR-path NLL; used on training batches at log steps and on the held-out split."""
  bounds = {w: loss_lib.make_bound(model, cfg, w) for w in cfg.bound.windows}
  ar_fn = loss_lib.make_ar_path_nll(model, cfg)

  def measure(params, batch, rng):
    out = {}
    for i, (w, fn) in enumerate(bounds.items()):
      for name, value in fn(params, batch, jax.random.fold_in(rng, i)).items():
        out[f"bound_w{w}/{name}"] = value
    out.update(ar_fn(params, batch, jax.random.fold_in(rng, len(bounds))))
    return out

  return measure


def window_name(w):
  return "L" if w == -1 else str(w)


def summarize(sums, windows):
  """Per-token averages from measure()'s sums (possibly accumulated over batches)."""
  n = max(float(sums["tokens"]), 1.0)
  out = {}
  for w in windows:
    nb = max(float(sums[f"bound_w{w}/tokens"]), 1.0)
    name = window_name(w)
    out[f"bound_w{name}_bpt"] = float(sums[f"bound_w{w}/bound"]) / nb / LN2
    for term in ("diffusion", "recon", "prior"):
      out[f"bound_w{name}_{term}_bpt"] = float(sums[f"bound_w{w}/{term}"]) / nb / LN2
  out["ar_nll"] = float(sums["ar_nll"]) / n
  out["ar_ppl"] = math.exp(min(out["ar_nll"], 50.0))
  out["clean_ar_nll"] = float(sums["clean_nll"]) / max(float(sums["clean_tokens"]), 1.0)
  out["clean_ar_ppl"] = math.exp(min(out["clean_ar_nll"], 50.0))
  return out


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
  """Everything a run needs, built from its config; `run()` trains, `evaluate()` measures."""

  def __init__(self, cfg, workdir):
    check_workdir_config(cfg, workdir)
    os.makedirs(workdir, exist_ok=True)
    self.cfg, self.workdir = cfg, workdir
    self.mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_size(self.mesh, cfg.data.batch_size, cfg.train.grad_accum_steps)
    self.tokenizer = data.load_or_train_tokenizer(
        cfg.data.tokenizer, workdir, cfg.data.corpus, cfg.model.vocab_size,
        cfg.data.heldout_fraction, cfg.data.text_field)
    # More embedding rows than pieces is fine: HF checkpoints pad their vocabularies.
    if self.tokenizer.vocab_size > cfg.model.vocab_size:
      raise ConfigError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} "
                        f"pieces but model.vocab_size={cfg.model.vocab_size}")
    if cfg.model.attention == "chunked":
      attention.query_chunk(cfg.model.attention_chunk, 2 * cfg.data.seq_len)
    layout = state_layout(cfg, self.mesh)
    self.model, self.tx = layout.model, layout.tx
    self.state_sharding, self.abstract_state = layout.shardings, layout.abstract
    self._init = layout.init
    self.lr = learning_rate_fn(cfg.optim, cfg.train.steps)

    repl = sharding.replicated(self.mesh)
    rules = sharding.logical_rules(cfg.sharding.rules)
    batch_sh = sharding.batch_sharding(self.mesh)
    self._step = jit_train_step(self.model, self.tx, cfg, self.mesh, self.state_sharding)
    self._measure = sharding.traced_under_rules(
        jax.jit(make_measure(self.model, cfg),
                in_shardings=(self.state_sharding.params, batch_sh, repl),
                out_shardings=repl), self.mesh, rules)
    # Recorded only now that every setting has been validated, so that a mistyped first
    # attempt does not leave a config behind that refuses the corrected command. Process 0
    # alone writes it: processes writing the shared workdir's file at once can collide.
    if jax.process_index() == 0:
      checkpoint.write_config(workdir, cfg.to_dict())

  def dataset(self, split):
    d = self.cfg.data
    return data.make_dataset(
        d.corpus, split, self.tokenizer, d.seq_len, d.batch_size, seed=self.cfg.seed,
        heldout_fraction=d.heldout_fraction, text_field=d.text_field,
        process_index=jax.process_index(), process_count=jax.process_count(),
        shuffle_rows=d.shuffle_rows)

  def global_batch(self, local):
    return sharding.global_batch(local, self.mesh)

  def step(self, state, local_batch):
    return self._step(state, self.global_batch(local_batch))

  def measure(self, params, local_batch, step, salt=0):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step), salt)
    return self._measure(params, self.global_batch(local_batch), rng)

  def evaluate(self, params, batches, step):
    """The bound and AR-path perplexity over the held-out batches."""
    total = None
    for i, batch in enumerate(batches):
      sums = jax.device_get(self.measure(params, batch, step, salt=i + 1))
      total = sums if total is None else jax.tree.map(np.add, total, sums)
    return summarize(total, self.cfg.bound.windows)

  def run(self, log=print):
    cfg, workdir = self.cfg, self.workdir
    tcfg = cfg.train
    ckpts = checkpoint.RunCheckpoints(workdir, keep=tcfg.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    data_iter = iter(self.dataset("train"))
    eval_batches = data.make_eval_batches(
        cfg.data.corpus, self.tokenizer, cfg.data.seq_len, cfg.data.batch_size,
        tcfg.eval_batches, cfg.data.heldout_fraction, cfg.data.text_field,
        process_index=jax.process_index(), process_count=jax.process_count())

    start = ckpts.latest_step()
    if start is None:
      state, start = self._init(jax.random.key(cfg.seed)), 0
    elif not ckpts.has_data(start):  # an imported model (evo_jax/convert.py): data starts fresh
      state = ckpts.restore(start, self.abstract_state)
      log(f"starting from the weights in {ckpts.directory}/{start}")
    else:
      state = ckpts.restore(start, self.abstract_state, data_iter)
      log(f"resumed from {ckpts.directory}/{start}")

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(f"{workdir}: {n_params:,} parameters, mesh {dict(self.mesh.shape)}, "
        f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens per step, steps {start} -> "
        f"{tcfg.steps} (the first step compiles)")
    tick, tick_step, tokens_since = time.perf_counter(), start, 0
    for step in range(start, tcfg.steps):
      batch = next(data_iter)
      if tcfg.record_batches:
        record_rows(workdir, step, batch)
      tokens_since += int(np.sum(batch["segment_ids"] > 0))
      state, aux = self.step(state, batch)
      done = step + 1
      if step == start:  # the first step compiles: keep it out of the throughput
        jax.block_until_ready(aux)
        tick, tick_step, tokens_since = time.perf_counter(), done, 0
      if done % tcfg.log_every == 0 or done == tcfg.steps:
        aux = jax.device_get(aux)
        now = time.perf_counter()
        record = self._train_record(aux, done)
        record.update(summarize(jax.device_get(self.measure(state.params, batch, done)),
                               cfg.bound.windows))
        record["tokens_per_sec"] = tokens_since / (now - tick) if done > tick_step else None
        record["split"] = "train"
        writer.write(done, record)
        log(status_line(done, tcfg.steps, record, tokens_since / max(done - tick_step, 1)))
        tick, tick_step, tokens_since = time.perf_counter(), done, 0
      if done % tcfg.eval_every == 0 or done == tcfg.steps:
        ev = self.evaluate(state.params, eval_batches, done)
        writer.write(done, {"split": "heldout", **ev})
        log(f"  held-out @ {done}: AR-path ppl {ev['ar_ppl']:.2f} | clean ppl "
            f"{ev['clean_ar_ppl']:.2f} | " + " | ".join(
                f"bound(W={window_name(w)}) {ev[f'bound_w{window_name(w)}_bpt']:.4g} bpt"
                for w in cfg.bound.windows))
        tick = time.perf_counter()  # evaluation time is not training throughput
      if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
        ckpts.save(done, state, data_iter, cfg.to_dict())
    ckpts.wait()
    ckpts.close()
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


def record_rows(workdir, step, local_batch):
  """Appends a hash of every row this process read at `step` to batches/process_<i>.jsonl:
  which host read which data, checkable after the fact."""
  os.makedirs(os.path.join(workdir, "batches"), exist_ok=True)
  rows = [hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in np.asarray(local_batch["tokens"])]
  path = os.path.join(workdir, "batches", f"process_{jax.process_index()}.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps({"step": step, "rows": rows}) + "\n")


def status_line(step, total, r, tokens_per_step):
  tps = r.get("tokens_per_sec")
  eta = f"eta {(total - step) * tokens_per_step / tps / 60:.1f} min" if tps else ""
  return (f"step {step:>6}/{total} | loss {r['loss']:.3f} | AR-path ppl {r['ar_ppl']:.1f} | "
          f"clean ppl {r['clean_ar_ppl']:.1f} | t-err {r['time_abs_err']:.3f} | "
          f"lr {r['lr']:.1e} | " + (f"{tps:,.0f} tok/s | {eta}" if tps else ""))


def train_and_report(cfg, workdir, log=print):
  trainer = Trainer(cfg, workdir)
  trainer.run(log=log)
  if jax.process_index() == 0 and cfg.train.samples > 0:
    from evo_jax import decode  # the report decodes from the checkpoint on disk
    decode.print_report(workdir, cfg.train.samples, cfg.train.sample_tokens,
                        cfg.train.sample_prompt, log=log)


def main(argv=None):
  with cli.user_errors():
    cfg, args = cli.parse_args(sys.argv[1:] if argv is None else argv, __doc__,
                               extra=distributed.add_flags)
    distributed.initialize(args)
    train_and_report(cfg, args.workdir)


if __name__ == "__main__":
  main()
