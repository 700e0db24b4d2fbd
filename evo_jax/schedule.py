"""The noising path of method.md section 1: z = a(t) e(x) + s(t) eps, and its log-SNR.

Everything here is a pure function of t (any shape), so it can be used inside jit and
differentiated (the `elbo` weighting needs d lambda / dt, taken with jax.jvp). `latent_noise` is
the noise a latent starts from at t = 1, keyed by its position.
"""
import dataclasses

import jax
import jax.numpy as jnp

from evo_jax.errors import ConfigError

KINDS = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """kind: `linear` (rectified flow) or `cosine`; shift k >= 1 warps t toward the noisy end."""
  kind: str
  shift: float        # the default lives in config.py (schedule.shift)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"schedule.kind must be one of {KINDS}, got {self.kind!r}")
    if self.shift <= 0:
      raise ConfigError(f"schedule.shift must be > 0, got {self.shift}")

  def warp(self, t):
    """t -> k t / (1 + (k - 1) t): the time the base schedule actually sees."""
    k = self.shift
    return k * t / (1.0 + (k - 1.0) * t)

  def unwarp(self, u):
    k = self.shift
    return u / (k - (k - 1.0) * u)

  def alpha_sigma(self, t):
    u = self.warp(t)
    if self.kind == "linear":
      return 1.0 - u, u
    return jnp.cos(0.5 * jnp.pi * u), jnp.sin(0.5 * jnp.pi * u)

  def log_snr(self, t):
    """lambda(t) = 2 log(a / s), computed in a form that is stable near both ends."""
    u = self.warp(t)
    if self.kind == "linear":
      return 2.0 * (jnp.log1p(-u) - jnp.log(u))
    return -2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * u))

  def t_from_log_snr(self, lam):
    """The inverse of log_snr: the t at which the path has log-SNR lam."""
    if self.kind == "linear":
      u = jax.nn.sigmoid(-0.5 * lam)
    else:
      u = jnp.arctan(jnp.exp(-0.5 * lam)) * (2.0 / jnp.pi)
    return self.unwarp(u)

  def noise(self, e_BxLxD, t_BxL, eps_BxLxD):
    a, s = self.alpha_sigma(t_BxL)
    return a[..., None] * e_BxLxD + s[..., None] * eps_BxLxD


def posterior_logits(sched, z_BxTxD, t_BxT, e_VxD):
  """log N(z; a(t) e(v), s(t)^2 I) for every token v, up to a term constant in v: what a
  latent alone says about its token (model.posterior_logits adds it to the network's logits,
  so that at W = 1 they are Bayes' rule on the prediction from the prefix). Zero at t = 1."""
  a, s = sched.alpha_sigma(t_BxT)
  precision = 1.0 / jnp.square(jnp.maximum(s, 1e-3))      # s = 0 only at t = 0 (clean)
  ze = jnp.einsum("btd,vd->btv", z_BxTxD.astype(jnp.float32), e_VxD)
  return ((a * precision)[..., None] * ze
          - (0.5 * a * a * precision)[..., None] * jnp.sum(jnp.square(e_VxD), -1))


def latent_noise(rng, positions_BxW, dim):
  """The pure noise (t = 1) of a latent at each position: a function of the key and the
  position only, so that the decoding loop, the AR-path scorer and the tests draw the same
  latent for the same position however rows are batched or padded."""
  key = jax.random.fold_in(rng, 0)
  draw = lambda p: jax.random.normal(jax.random.fold_in(key, p), (dim,))
  return jax.vmap(jax.vmap(draw))(positions_BxW)


def from_config(cfg) -> Schedule:
  return Schedule(kind=cfg.kind, shift=float(cfg.shift))
