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
BASES = ("uniform", "logit_normal", "adaptive")


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
  if cfg.t_base == "adaptive":
    if cfg.adaptive_bins < 2:
      raise ConfigError(f"progression.adaptive_bins must be >= 2, got {cfg.adaptive_bins}")
    if not 0 < cfg.adaptive_floor <= 1:
      raise ConfigError(f"progression.adaptive_floor must be in (0, 1] (the uniform share that "
                        f"keeps mass at every t), got {cfg.adaptive_floor}")
    if not 0 <= cfg.adaptive_decay < 1:
      raise ConfigError(f"progression.adaptive_decay must be in [0, 1), got "
                        f"{cfg.adaptive_decay}")


def adaptive_bins(cfg):
  """The number of t bins whose loss the train state tracks (0 unless t_base is adaptive)."""
  return int(cfg.adaptive_bins) if cfg.t_base == "adaptive" else 0


def adaptive_density(cfg, ce_by_bin):
  """[n] probabilities of the n equal t bins (time warping, as CDCD's: the cumulative latent
  cross-entropy as a function of t is the CDF to sample from, so t goes where the loss still
  changes with t): each bin's rise of the running mean CE over the bin before (the first bin:
  over 0), clipped at 0, normalised, mixed with a uniform share adaptive_floor. All rises 0 (a
  fresh run): uniform."""
  rise = jnp.maximum(jnp.diff(ce_by_bin, prepend=0.0), 0.0)
  total = jnp.sum(rise)
  n = ce_by_bin.shape[0]
  shaped = jnp.where(total > 0, rise / jnp.maximum(total, 1e-30), 1.0 / n)
  return cfg.adaptive_floor / n + (1.0 - cfg.adaptive_floor) * shaped


def update_bin_ce(cfg, ce_by_bin, sums, counts):
  """The running mean CE per bin after one step's sums and counts (bins without a token in
  this step keep their value; a bin's first value is its first mean)."""
  mean = sums / jnp.maximum(counts, 1)
  fresh = ce_by_bin == 0
  decay = jnp.where(fresh, 0.0, cfg.adaptive_decay)
  return jnp.where(counts > 0, decay * ce_by_bin + (1 - decay) * mean, ce_by_bin)


def t_bin(t, n):
  """The bin of each t < 1 among n equal bins of [0, 1)."""
  return jnp.clip(jnp.floor(t * n), 0, n - 1).astype(jnp.int32)


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


def base_times(cfg, u, density=None):
  """Maps uniforms in [0, 1) to the base distribution of t (monotone, so stratification holds).
  adaptive: the inverse CDF of the piecewise-constant `density` over equal bins (None: a
  fresh run's, uniform)."""
  if cfg.t_base == "uniform" or (cfg.t_base == "adaptive" and density is None):
    return u
  if cfg.t_base == "adaptive":
    n = density.shape[0]
    cdf = jnp.cumsum(density)
    b = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, n - 1)
    below = jnp.where(b > 0, cdf[jnp.maximum(b - 1, 0)], 0.0)
    inside = jnp.clip((u - below) / density[b], 0.0, 1.0 - 1e-6)
    return (b + inside) / n
  z = ndtri(jnp.clip(u, 1e-6, 1 - 1e-6))
  return jax.nn.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * z)


def base_density(cfg, t, density=None):
  """Density of base_times' output at t (the importance weight of the `elbo` weighting)."""
  if cfg.t_base == "uniform" or (cfg.t_base == "adaptive" and density is None):
    return jnp.ones_like(t)
  if cfg.t_base == "adaptive":
    n = density.shape[0]
    return n * density[t_bin(t, n)]
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


def sample(rng, cfg, batch_size, seq_len, step, density=None):
  """Returns t [B, L] in [0, 1], window size [B] and offset [B] (int32). density: the bins'
  probabilities when t_base is adaptive (adaptive_density)."""
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

  shared = base_times(cfg, u_win, density)
  # ramp: position k of a window gets (k + u) / W, rising left to right like a decoding front.
  ramp = base_times(cfg, (k_in_window + u_win) / W_B[:, None], density)
  independent = base_times(cfg, u_BxL, density)
  t_BxL = jnp.select(
      [pattern_B[:, None] == 0, pattern_B[:, None] == 1], [shared, ramp], independent)
  to_one = jnp.where(pattern_B[:, None] == 2, one_BxL, one_win)
  t_BxL = jnp.where(to_one, 1.0, t_BxL)
  return t_BxL.astype(jnp.float32), W_B, o_B
