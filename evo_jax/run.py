"""A trained run, loaded for inference: `load_run(workdir)` -> Run, and the report that
training prints at its end (headline numbers and a few samples).

sample, bench, evaluate, the lm-eval model and export all start from `load_run`.
"""
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from evo_jax import attention
from evo_jax import checkpoint
from evo_jax import config as config_lib
from evo_jax import data
from evo_jax import decoding
from evo_jax import guards
from evo_jax import metrics
from evo_jax import schedule
from evo_jax import sharding
from evo_jax import state as state_lib
from evo_jax.checkpoint import CheckpointError


class Run(NamedTuple):
  workdir: str
  cfg: ml_collections.ConfigDict      # the run's config (fields it predates: their defaults)
  model: object                       # model.EvoTransformer
  params: dict
  tokenizer: object                   # data.Tokenizer or data.HFTokenizer
  step: int                           # of the checkpoint loaded

  @property
  def schedule(self):
    return schedule.from_config(self.cfg.schedule)

  @property
  def context(self):
    return self.cfg.data.seq_len

  def check_policy(self, policy):
    """A one-line error for a policy this run cannot decode with: the clean stream's
    next-token readout (readout=clean) is only trained with loss.clean_ar_weight > 0."""
    if policy.readout == "clean" and self.cfg.loss.clean_ar_weight <= 0:
      raise decoding.DecodingError(
          f"policy {policy.name} decodes with the clean stream's next-token readout, which the "
          f"run in {self.workdir} did not train (its loss.clean_ar_weight is 0)")


def read_run_config(workdir):
  """The config a workdir's run was trained with, as a full ConfigDict."""
  saved = checkpoint.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"no run in {workdir}: {checkpoint.CONFIG_FILE} not found")
  return config_lib.from_saved(saved)


def load_run(workdir, mesh=None) -> Run:
  """The latest checkpoint in workdir, its state laid out on `mesh` (default: one device),
  whatever mesh it was saved from."""
  cfg = read_run_config(workdir)
  kernel_backends = attention.KERNEL_BACKENDS.get(cfg.model.attention)
  if kernel_backends and jax.default_backend() not in kernel_backends:
    cfg.model.attention = "dense"    # trained with a GPU kernel, loaded elsewhere: the same math
  ckpts = checkpoint.RunCheckpoints(workdir, async_save=False)
  step = ckpts.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {ckpts.directory}")
  if mesh is None:
    mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  layout = state_lib.state_layout(cfg, mesh)
  try:
    state = ckpts.restore(step, layout.abstract)
  except checkpoint.DamagedCheckpointError:
    raise
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"checkpoint {ckpts.directory}/{step} does not match the model of "
                          f"{workdir}/{checkpoint.CONFIG_FILE}: {str(e).splitlines()[0]}") from None
  finally:
    ckpts.close()
  bad = guards.nonfinite_leaves(state.params)
  if bad:
    raise CheckpointError(f"checkpoint {ckpts.directory}/{step} has non-finite parameters "
                          f"({len(bad)} arrays hold NaN or Inf, the first: {bad[0]})")
  d = cfg.data
  tokenizer = data.load_or_train_tokenizer(d.tokenizer, workdir, d.corpus, cfg.model.vocab_size,
                                           d.heldout_fraction, d.text_field)
  data.check_tokenizer(tokenizer, workdir)
  return Run(workdir, cfg, layout.model, state.params, tokenizer, int(step))


def headline(workdir):
  """The run's headline numbers from its metrics.jsonl: median training throughput and the
  latest held-out measurements."""
  records = metrics.read_metrics(workdir)
  speeds = [r["tokens_per_sec"] for r in records
            if r.get("split") == "train" and r.get("tokens_per_sec")]
  heldout = [r for r in records if r.get("split") == "heldout"]
  out = {"train_tokens_per_sec (median)": float(np.median(speeds)) if speeds else None}
  if heldout:
    last = heldout[-1]
    out.update({f"heldout {k} @ {last['step']}": last.get(k) for k in
                ("ar_ppl", "clean_ar_ppl", "bound_wL_bpt", "bound_w1_bpt")})
  return out


def print_report(workdir, n_samples, max_new_tokens, prompt, log=print):
  """The end-of-training report, decoded from the checkpoint on disk (what a user gets)."""
  run = load_run(workdir)
  log(f"\n== {workdir}: checkpoint at step {run.step} ==")
  for key, value in headline(workdir).items():
    if value is not None:
      log(f"{key:>34}: {value:,.3f}")
  ids = [run.tokenizer.bos_id] + run.tokenizer.encode(prompt)
  samples = decoding.generate(
      run.model, run.params, run.schedule, [ids] * n_samples, decoding.POLICIES["ar"],
      max_new_tokens=max_new_tokens, context=run.context, eos_id=run.tokenizer.eos_id,
      temperature=0.8)
  for i, s in enumerate(samples):
    log(f"-- sample {i + 1} (policy ar, temperature 0.8) --\n{prompt}"
        f"{run.tokenizer.decode(s.tokens)}")
