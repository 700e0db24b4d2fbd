"""Training-time progression sampler (method.md section 4): per sequence, a window size W,
an offset o, a t pattern inside each window, and the per-token times t.

All randomness comes from the key the caller passes (folded with the step), so a resumed
run draws exactly what an uninterrupted one would.
"""
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from evo_jax import attention
from evo_jax.errors import ConfigError

PATTERNS = ("shared", "ramp", "independent")
BASES = ("uniform", "logit_normal")


def check_config(cfg):
  """A one-line error for a `progression` setting that sample() would misread (a typo in
  t_base would otherwise silently run logit_normal)."""
  if cfg.t_base not in BASES:
    raise ConfigError(f"progression.t_base must be one of {BASES}, got {cfg.t_base!r}")
  if any(w != -1 and w < 1 for w in cfg.window_sizes) or not cfg.window_sizes:
    raise ConfigError(f"progression.window_sizes must be sizes >= 1 or -1 (the whole "
                      f"sequence), got {tuple(cfg.window_sizes)}")
  for name in ("window_probs", "window_probs_start"):
    probs = tuple(cfg[name])
    if name == "window_probs_start" and not probs:
      continue
    if len(probs) != len(cfg.window_sizes) or min(probs) < 0 or sum(probs) <= 0:
      raise ConfigError(f"progression.{name} must be {len(cfg.window_sizes)} weights >= 0 "
                        f"(one per window size) with a positive sum, got {probs}")
  weights = [cfg.pattern_probs[p] for p in PATTERNS]
  if min(weights) < 0 or sum(weights) <= 0:
    raise ConfigError(f"progression.pattern_probs must be weights >= 0 with a positive sum, "
                      f"got {dict(zip(PATTERNS, weights))}")
  if not 0 <= cfg.p_t_one <= 1:
    raise ConfigError(f"progression.p_t_one must be in [0, 1], got {cfg.p_t_one}")
  if cfg.logit_normal_std <= 0:
    raise ConfigError(f"progression.logit_normal_std must be > 0, got {cfg.logit_normal_std}")


def window_sizes(cfg, seq_len):
  """Configured sizes with -1 meaning the whole sequence (full-sequence diffusion)."""
  return [seq_len if w == -1 else min(int(w), seq_len) for w in cfg.window_sizes]


def window_probs(cfg, step):
  """The W mixture at this step: linear from window_probs_start to window_probs over
  curriculum_steps (the "evolving balance" curriculum); constant when no start is given."""
  end = jnp.asarray(cfg.window_probs, jnp.float32)
  if not cfg.window_probs_start or cfg.curriculum_steps <= 0:
    return end / end.sum()
  start = jnp.asarray(cfg.window_probs_start, jnp.float32)
  frac = jnp.clip(step / cfg.curriculum_steps, 0.0, 1.0)
  probs = (1.0 - frac) * start / start.sum() + frac * end / end.sum()
  return probs


def base_times(cfg, u):
  """Maps uniforms in [0, 1) to the base distribution of t (monotone, so stratification holds)."""
  if cfg.t_base == "uniform":
    return u
  z = ndtri(jnp.clip(u, 1e-6, 1 - 1e-6))
  return jax.nn.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * z)


def base_density(cfg, t):
  """Density of base_times' output at t (the importance weight of the `elbo` weighting)."""
  if cfg.t_base == "uniform":
    return jnp.ones_like(t)
  t = jnp.clip(t, 1e-6, 1 - 1e-6)
  logit = jnp.log(t) - jnp.log1p(-t)
  std = cfg.logit_normal_std
  return (jnp.exp(-0.5 * ((logit - cfg.logit_normal_mean) / std) ** 2)
          / (std * jnp.sqrt(2 * jnp.pi) * t * (1 - t)))


def stratified_uniforms(rng, batch_size, seq_len, stratified):
  """[B, L] uniforms; when stratified, each column is an evenly spaced (antithetic) set across
  the batch with one random shift, which lowers the variance of batch-averaged losses."""
  if not stratified:
    return jax.random.uniform(rng, (batch_size, seq_len))
  k_shift, k_perm = jax.random.split(rng)
  shift_L = jax.random.uniform(k_shift, (seq_len,))
  rank_BxL = jax.vmap(lambda k: jax.random.permutation(k, batch_size), out_axes=1)(
      jax.random.split(k_perm, seq_len))
  return jnp.mod(shift_L[None, :] + rank_BxL / batch_size, 1.0)


def sample(rng, cfg, batch_size, seq_len, step):
  """Returns t [B, L] in [0, 1], window size [B] and offset [B] (int32)."""
  k_w, k_o, k_p, k_u, k_one = jax.random.split(rng, 5)
  sizes = jnp.asarray(window_sizes(cfg, seq_len), jnp.int32)
  probs = window_probs(cfg, step)
  W_B = sizes[jax.random.categorical(k_w, jnp.log(probs), shape=(batch_size,))]
  o_B = jnp.floor(jax.random.uniform(k_o, (batch_size,)) * W_B).astype(jnp.int32)
  pattern_probs = jnp.asarray([cfg.pattern_probs[p] for p in PATTERNS], jnp.float32)
  pattern_B = jax.random.categorical(k_p, jnp.log(pattern_probs), shape=(batch_size,))

  u_BxL = stratified_uniforms(k_u, batch_size, seq_len, cfg.stratified)
  one_BxL = jax.random.uniform(k_one, (batch_size, seq_len)) < cfg.p_t_one
  # Per-window draws are read at the window's first position, so a window shares them.
  i_L = jnp.arange(seq_len)
  w_BxL = attention.window_ids(W_B, o_B, seq_len)
  start_BxL = jnp.maximum(w_BxL * W_B[:, None] - o_B[:, None], 0)
  u_win = jnp.take_along_axis(u_BxL, start_BxL, axis=1)
  one_win = jnp.take_along_axis(one_BxL, start_BxL, axis=1)
  k_in_window = jnp.mod(i_L[None, :] + o_B[:, None], W_B[:, None])

  shared = base_times(cfg, u_win)
  # ramp: position k of a window gets (k + u) / W, rising left to right like a decoding front.
  ramp = base_times(cfg, (k_in_window + u_win) / W_B[:, None])
  independent = base_times(cfg, u_BxL)
  t_BxL = jnp.select(
      [pattern_B[:, None] == 0, pattern_B[:, None] == 1], [shared, ramp], independent)
  to_one = jnp.where(pattern_B[:, None] == 2, one_BxL, one_win)
  t_BxL = jnp.where(to_one, 1.0, t_BxL)
  return t_BxL.astype(jnp.float32), W_B, o_B
