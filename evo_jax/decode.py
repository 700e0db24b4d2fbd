"""Loading a trained run for inference, the no-cache AR path, and the end-of-training report.

`ar_path_logits` is the AR path of method.md section 5 written as plainly as possible: the clean
prefix recomputed from scratch, plus one latent at t = 1 (pure noise: a(1) = 0 for every
schedule) in a window of its own. The decoders (every policy, with a KV cache) are in
evo_jax/sampler.py; this function stays as the reference they are tested against.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from evo_jax import checkpoint
from evo_jax import data
from evo_jax import metrics
from evo_jax import sampler
from evo_jax import schedule
from evo_jax import sharding
from evo_jax import train
from evo_jax.checkpoint import CheckpointError


def load_run(workdir, mesh=None):
  """-> (config, model, params, tokenizer, step) from the latest checkpoint in workdir, its
  state laid out on `mesh` (default: one device), whatever mesh it was saved from."""
  saved = checkpoint.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"no run in {workdir}: {checkpoint.CONFIG_FILE} not found")
  cfg = ml_collections.ConfigDict(saved)
  ckpts = checkpoint.RunCheckpoints(workdir, async_save=False)
  step = ckpts.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {ckpts.directory}")
  if mesh is None:
    mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  layout = train.state_layout(cfg, mesh)
  model, abstract = layout.model, layout.abstract
  try:
    state = ckpts.restore(step, abstract)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"checkpoint {ckpts.directory}/{step} does not match the model of "
                          f"{workdir}/{checkpoint.CONFIG_FILE}: {str(e).splitlines()[0]}") from None
  ckpts.close()
  d = cfg.data
  tokenizer = data.load_or_train_tokenizer(d.tokenizer, workdir, d.corpus, cfg.model.vocab_size,
                                           d.heldout_fraction, d.text_field)
  return cfg, model, state.params, tokenizer, step


def ar_path_logits(model, params, tokens_BxT, n_B, eps_BxD):
  """Logits [B, V] for position n of each row: the clean prefix tokens[:n] plus one latent at
  t = 1 at position n (W = 1). Clean positions >= n are present but never seen."""
  B, T = tokens_BxT.shape
  D = eps_BxD.shape[-1]
  tokens = jnp.concatenate([tokens_BxT, jnp.zeros((B, 1), tokens_BxT.dtype)], axis=1)
  latents = jnp.concatenate([jnp.zeros((B, T, D)), eps_BxD[:, None]], axis=1)
  is_latent = jnp.arange(T + 1)[None, :] == T
  is_latent = jnp.broadcast_to(is_latent, (B, T + 1))
  t = is_latent.astype(jnp.float32)
  positions = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(T), (B, T)), n_B[:, None]], axis=1)
  i = jnp.arange(T + 1)
  clean_rows = (i[:, None] >= i[None, :]) & (i[None, :] < T)
  latent_row = (i[None, :] < n_B[:, None]) | (i[None, :] == T)      # [B, T+1]
  mask = jnp.where(is_latent[:, :, None], latent_row[:, None, :], clean_rows[None])
  logits, _ = model.apply(params, tokens, latents, is_latent, t, positions, mask)
  return logits[:, T]


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
  cfg, model, params, tokenizer, step = load_run(workdir)
  log(f"\n== {workdir}: checkpoint at step {step} ==")
  for key, value in headline(workdir).items():
    if value is not None:
      log(f"{key:>34}: {value:,.3f}")
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  samples = sampler.generate(
      model, params, schedule.from_config(cfg.schedule), [ids] * n_samples,
      sampler.POLICIES["ar"], max_new_tokens=max_new_tokens, context=cfg.data.seq_len,
      eos_id=tokenizer.eos_id, temperature=0.8)
  for i, s in enumerate(samples):
    log(f"-- sample {i + 1} (policy ar, temperature 0.8) --\n{prompt}{tokenizer.decode(s.tokens)}")
