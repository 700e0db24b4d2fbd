"""Measuring a run: the variational bound for each window W of `bound.windows` and the AR-path
likelihood, summed over batches and reported under one set of names, the names of
metrics.jsonl, of evaluate's results files and of the tables (bits or nats per token):

  bound_w{W}_bpt, bound_w{W}_diffusion_bpt, bound_w{W}_recon_bpt, bound_w{W}_prior_bpt
      (W = 1, 4, ..., or L for the whole row)
  ar_nll, ar_ppl            the AR path (latent stream, W = 1, t = 1): log p(x_i | x_<i)
  clean_ar_nll, clean_ar_ppl  the clean stream's next-token readout

Training logs them on its batches and the held-out split, `bench bound` for other log-SNR
ranges, `evaluate --task likelihood` for the bounds of its documents.
"""
import math

import jax
import numpy as np

from evo_jax import loss as loss_lib

LN2 = math.log(2.0)
BOUND_TERMS = ("diffusion", "recon", "prior")


def window_name(w):
  return "L" if w == -1 else str(w)


def make_measure(model, cfg, windows=None, ar_path=True, noise_seed=0):
  """measure(params, batch, rng) -> sums for the bound of each W in `windows` (default
  bound.windows) and, with ar_path, the AR-path NLL. The bound's draws come from rng; the AR
  path's latents are schedule.latent_noise(key(noise_seed), position), as in scoring.py."""
  windows = tuple(cfg.bound.windows if windows is None else windows)
  bounds = {w: loss_lib.make_bound(model, cfg, w) for w in windows}

  def measure(params, batch, rng):
    out = {}
    for i, (w, fn) in enumerate(bounds.items()):
      for name, value in fn(params, batch, jax.random.fold_in(rng, i)).items():
        out[f"bound_w{w}/{name}"] = value
    if ar_path:
      out.update(loss_lib.ar_path_nll(model, params, batch, jax.random.key(noise_seed)))
    return out

  return measure


def summarize(sums, windows):
  """Per-token averages from measure()'s sums (possibly accumulated over batches)."""
  out = {}
  for w in windows:
    nb = max(float(sums[f"bound_w{w}/tokens"]), 1.0)
    name = window_name(w)
    out[f"bound_w{name}_bpt"] = float(sums[f"bound_w{w}/bound"]) / nb / LN2
    for term in BOUND_TERMS:
      out[f"bound_w{name}_{term}_bpt"] = float(sums[f"bound_w{w}/{term}"]) / nb / LN2
  if "ar_nll" in sums:
    out["ar_nll"] = float(sums["ar_nll"]) / max(float(sums["tokens"]), 1.0)
    out["ar_ppl"] = math.exp(min(out["ar_nll"], 50.0))
    out["clean_ar_nll"] = float(sums["clean_nll"]) / max(float(sums["clean_tokens"]), 1.0)
    out["clean_ar_ppl"] = math.exp(min(out["clean_ar_nll"], 50.0))
  return out


def measure_batches(measure, batches, rng, windows, progress=None):
  """summarize() of the sums of measure(batch, fold_in(rng, i)) over the batches; `progress`
  (a progress.Progress) is advanced once per batch."""
  total = None
  for i, batch in enumerate(batches):
    sums = jax.device_get(measure(batch, jax.random.fold_in(rng, i)))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
    if progress is not None:
      progress.advance()
  if total is None:
    raise ValueError("measure_batches: no batches")
  return summarize(total, windows)
