"""Loading a trained run for inference, and the simplest decoder: the AR path.

AR decoding (method.md section 5, policy `ar`): the committed prefix is clean, the next token
is one latent at t = 1 (pure noise: a(1) = 0 for every schedule) in a window of its own, and it
jumps to t = 0 in a single step by sampling from the latent's logits. This module recomputes
the prefix at every step; the sampler with the KV cache and the other policies builds on it.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from evo_jax import checkpoint
from evo_jax import data
from evo_jax import metrics
from evo_jax import model as model_lib
from evo_jax import train
from evo_jax.checkpoint import CheckpointError


def load_run(workdir):
  """-> (config, model, params, tokenizer, step) from the latest checkpoint in workdir."""
  saved = checkpoint.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"no run in {workdir}: {checkpoint.CONFIG_FILE} not found")
  cfg = ml_collections.ConfigDict(saved)
  ckpts = checkpoint.RunCheckpoints(workdir, async_save=False)
  step = ckpts.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {ckpts.directory}")
  model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
  tx = train.make_optimizer(cfg.optim, cfg.train.steps)
  abstract = jax.eval_shape(lambda r: train.init_state(model, tx, r), jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = checkpoint.abstract_like(abstract, jax.tree.map(lambda _: device, abstract))
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


def sample_token(rng, logits_BxV, temperature):
  if temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1)
  return jax.random.categorical(rng, logits_BxV / temperature, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def generate_ar(model, params, tokens_BxT, prompt_len_B, rng, temperature=1.0):
  """Fills tokens[:, prompt_len:] one token at a time along the AR path."""
  B, T = tokens_BxT.shape

  def body(n, carry):
    tokens, rng = carry
    rng, k_eps, k_tok = jax.random.split(rng, 3)
    eps = jax.random.normal(k_eps, (B, model.cfg.d_model))
    n_B = jnp.full((B,), n)
    new = sample_token(k_tok, ar_path_logits(model, params, tokens, n_B, eps), temperature)
    write = n >= prompt_len_B
    tokens = tokens.at[:, n].set(jnp.where(write, new, tokens[:, n]))
    return tokens, rng

  tokens, _ = jax.lax.fori_loop(jnp.min(prompt_len_B), T, body, (tokens_BxT, rng))
  return tokens


def complete(model, params, tokenizer, prompt, max_new_tokens, seed=0, temperature=1.0):
  """Text continuing `prompt`, stopped at EOS."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  buf = np.zeros((1, len(ids) + max_new_tokens), np.int32)
  buf[0, :len(ids)] = ids
  out = generate_ar(model, params, jnp.asarray(buf), jnp.asarray([len(ids)]),
                    jax.random.key(seed), temperature=temperature)
  new = [int(x) for x in np.asarray(out)[0, len(ids):]]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return tokenizer.decode(new)


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
  for i in range(n_samples):
    text = complete(model, params, tokenizer, prompt, max_new_tokens, seed=i, temperature=0.8)
    log(f"-- sample {i + 1} (AR path, temperature 0.8) --\n{prompt}{text}")
