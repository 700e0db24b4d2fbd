"""Test-only references: the math written as plainly as possible, with nothing shared with the
code under test but the model's forward pass.

`ar_path_logits` is the AR path of method.md section 5 for one position per row: the clean
prefix recomputed from scratch, plus one latent at t = 1 (pure noise: a(1) = 0 for every
schedule) in a window of its own, with its own mask. The decoding loop (with its KV cache) and
the one-pass AR path of loss.ar_path_forward are tested against it. `clean_greedy` is greedy
AR decoding of the clean stream (what an imported LLaMA/Qwen computes) without a cache.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from evo_jax import schedule
from evo_jax.model import EvoTransformer


def ar_path_logits(model, params, tokens_BxT, n_B, eps_BxD):
  """Logits [B, V] for position n of each row: the clean prefix tokens[:n] plus one latent at
  t = 1 at position n (W = 1), whose noise is eps. Clean positions >= n are present but never
  seen."""
  B, T = tokens_BxT.shape
  D = eps_BxD.shape[-1]
  tokens = jnp.concatenate([tokens_BxT, jnp.zeros((B, 1), tokens_BxT.dtype)], axis=1)
  latents = jnp.concatenate([jnp.zeros((B, T, D)), eps_BxD[:, None]], axis=1)
  is_latent = jnp.broadcast_to(jnp.arange(T + 1)[None, :] == T, (B, T + 1))
  t = is_latent.astype(jnp.float32)
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(T), (B, T)), n_B[:, None]], axis=1)
  i = jnp.arange(T + 1)
  clean_rows = (i[:, None] >= i[None, :]) & (i[None, :] < T)
  latent_row = (i[None, :] < n_B[:, None]) | (i[None, :] == T)      # [B, T+1]
  mask = jnp.where(is_latent[:, :, None], latent_row[:, None, :], clean_rows[None])
  logits, _ = model.apply(params, tokens, latents, is_latent, t, positions, mask)
  return logits[:, T]


def ar_path_logits_at(model, params, tokens_BxT, n_B, noise_key):
  """ar_path_logits with the latent noise the code draws for position n (latent_noise)."""
  eps = schedule.latent_noise(noise_key, n_B[:, None], model.cfg.d_model)[:, 0]
  return ar_path_logits(model, params, tokens_BxT, n_B, eps)


ar_path_logits_jit = jax.jit(ar_path_logits, static_argnums=0)
ar_path_logits_at_jit = jax.jit(ar_path_logits_at, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def clean_logits(model, params, tokens_BxT):
  """The clean stream's next-token logits [B, T, V] of a causal pass over the whole text, no
  latent and no cache: position i predicts token i + 1."""
  B, T = tokens_BxT.shape
  i = jnp.arange(T)
  mask = jnp.broadcast_to(i[:, None] >= i[None, :], (B, T, T))
  logits, _, _ = model.apply(params, tokens_BxT, None, None, jnp.zeros((B, T)),
                             jnp.broadcast_to(i, (B, T)), mask,
                             method=EvoTransformer.forward_with_cache)
  return logits


def clean_greedy(model, params, prompts, n_new, width=64):
  """Greedy AR decoding of the clean stream, recomputed from scratch for every token: the
  argmax of the last position's next-token logits, appended. All rows step together (a row's
  padding comes after its text, which the causal mask keeps out of sight)."""
  buf = np.zeros((len(prompts), width), np.int32)
  lens = np.asarray([len(p) for p in prompts])
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  for step in range(n_new):
    logits = np.asarray(clean_logits(model, params, jnp.asarray(buf)))
    buf[np.arange(len(prompts)), lens + step] = np.argmax(
        logits[np.arange(len(prompts)), lens + step - 1], axis=-1)
  return [list(buf[b, lens[b]:lens[b] + n_new]) for b in range(len(prompts))]
