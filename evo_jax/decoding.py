"""Decoding (method.md section 5): one jitted loop whose policies are settings, an exact KV cache.

A row (one prompt being continued) is, at every iteration of the loop:

    [ cached clean prefix | pending | window of W latents            | not yet entered ]
      prompt + committed    committed   z_i at their own times t_i      (pure noise, t = 1)
      keys/values cached    last step

- the cache holds the per-layer keys and values of the clean prefix. The clean stream is causal
  and never sees a latent, so they never change once written: the prompt is encoded once, and
  each committed token is encoded once;
- `pending` holds the tokens committed by the previous iteration. Their keys and values are not
  cached yet: they ride along as clean inputs in the next forward pass (as an AR decoder feeds
  its last sampled token once), and are written to the cache by it;
- the window holds W latents with their times t_i and ages (iterations spent in the window).

One iteration is one forward pass of [pending | window] (2W inputs) against the cache (with
model.self_conditioning, each latent also reads its e_hat of the previous pass; zeros when new):
  1. logits -> probabilities p_i, confidence c_i, predicted clean latent e_hat_i; time head t_hat_i;
  2. step sizes: t'_i = max(0, t_i - Delta_i); Delta_i = 1/K for the fixed policies; for `evo`
     Delta_i grows with c_i (and, as an option, with what the time head says: t_i - t_hat_i),
     bounded by [delta_min, delta_max]; optionally, an uncertain token goes back up by delta_min;
  3. the flow: z_i <- a(t'_i) e_hat_i + s(t'_i) eps_hat_i, eps_hat_i = (z_i - a(t_i) e_hat_i) / s(t_i);
  4. commit the leftmost run of latents with t'_i <= tau_c or c_i >= gamma; the leftmost latent
     is forced after n_max iterations in the window. A committed token is the argmax of its
     logits (temperature 0) or sampled with temperature / top-p. Stop at EOS or the length limit;
  5. the committed tokens become `pending`, the window slides past them, new latents enter at
     t = 1 with fresh noise.

Policies (`POLICIES`, or `make_policy(name, **settings)`):
  ar         W = 1, K = 1: one latent at t = 1 jumps to 0 (exactly AR decoding of the latent stream);
  ar_clean   AR decoding of the clean stream (readout=clean, W = 1): each pass feeds the last
             committed token as one clean input against the cache and commits the token its
             next-token logits give, with no latent at all; what an imported LLaMA/Qwen computes;
  verify     draft and verify (readout=clean, W > 1; method.md section 5): a pass feeds the last
             committed token and W - 1 drafts as clean inputs, and W windows of W latents, window
             a for the case that the first a drafts are accepted. The clean stream's next-token
             logits verify the drafts (the speculative-sampling rule: greedy, the longest run
             equal to its argmax) and commit one token more; window a then makes the next
             drafts (with `carry`, its latents, one flow step more mature, are also the next
             pass's windows; else new latents enter at t = 1 every pass). Lossless: the text
             is that of ar_clean (greedy), or has its distribution (sampling). Only the
             accepted tokens' keys and values are cached;
  diffusion  W = the whole generation, K equal steps, everything commits at t = 0;
  block      W = B, K steps per block (with ramp: a rolling front, W / K tokens a pass);
  evo        adaptive: the step of each token from its confidence and the time head.

Everything runs under one `jax.jit` with static shapes (a `lax.while_loop`; the cache, the window
and the outputs are fixed-size buffers), so no token triggers a recompilation. NFE counts the
forward passes of the loop per row (the prompt's one encoding pass is not counted).
"""
import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from evo_jax import schedule
from evo_jax.errors import UserError
from evo_jax.model import EvoTransformer

CONFIDENCES = ("max", "entropy")
UPDATES = ("flow", "ancestral")
READOUTS = ("latent", "clean")
STOP_REASONS = {0: "running", 1: "eos", 2: "length"}
T_EPS = 1e-4        # t' <= tau_c + T_EPS commits: K steps of 1/K must reach t = 0 despite rounding


class DecodingError(UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Policy:
  """The settings of the decoding loop (see the module docstring for where each one acts).
  `name`, `window` and `steps` have no default; the other defaults leave their mechanism off
  (fixed steps of 1/K, no early commit, no re-noising), so POLICIES below says all a policy
  changes."""
  name: str
  window: int                 # W latents decoded together; 0: the whole generation
  steps: int                  # K: the fixed step is Delta = 1 / K
  adaptive: bool = False      # evo: Delta_i from the confidence and the time head
  delta_min: float = 0.25     # evo: bounds of the adaptive step
  delta_max: float = 1.0
  sharpness: float = 1.0      # evo: Delta = delta_min + (delta_max - delta_min) * c^sharpness
  tau_c: float = 0.0          # commit when t' <= tau_c ...
  gamma: float = 2.0          # ... or when the confidence is >= gamma (> 1: never)
  n_max: int = 0              # force the leftmost latent after n_max iterations (0: K)
  confidence: str = "max"     # max probability, or 1 - entropy / log|V|
  use_time_head: bool = False  # evo: Delta_i >= t_i - t_hat_i (a latent the model finds mature)
  renoise_below: float = 0.0  # evo: confidence below this sends an uncommitted t back up
  noise: float = 0.0          # share of fresh noise in the flow update (0: deterministic)
  ramp: bool = False          # fixed steps: latent j of the window steps no lower than
                              # floor(j K / W) / K, so the left of the window matures first
                              # and W / K tokens commit a pass once the ramp is full (a rolling
                              # front, as training's ramp pattern); off: the window matures
                              # together and commits together
  update: str = "flow"        # flow: z <- a(t') e_hat + s(t') eps_hat, e_hat the mean latent;
                              # ancestral: pick a token x (as a commit would), then draw z from
                              # the path's bridge q(z_t' | z_t, x), with fresh noise
  bridge_noise: float = 1.0   # ancestral: the bridge's fresh noise, as a multiple of its exact
                              # std (0: its mean; from z = a(t) e(x) that is a(t') e(x))
  carry: bool = False         # verify: the drafting latents carry over between passes, one
                              # flow step (Delta) more mature; off: one-step drafts from t = 1
  accept_ratio: float = 1.0   # verify, greedy: a draft also passes when the clean stream gives
                              # it >= this share of its top probability (1: exact; < 1: lossy)
  readout: str = "latent"     # latent: commit from the latent stream; clean: from the clean
                              # stream's next-token logits, which verify W - 1 drafts made by
                              # the latents (W = 1: AR decoding of the clean stream)

  def __post_init__(self):
    if self.window < 0 or self.steps < 1 or self.n_max < 0:
      raise DecodingError(f"policy {self.name}: window must be >= 0 and steps >= 1, n_max >= 0 "
                         f"(got window={self.window}, steps={self.steps}, n_max={self.n_max})")
    if not 0 < self.delta_min <= self.delta_max <= 1:
      raise DecodingError(f"policy {self.name}: need 0 < delta_min <= delta_max <= 1 (got "
                         f"{self.delta_min}, {self.delta_max})")
    if self.confidence not in CONFIDENCES:
      raise DecodingError(f"policy {self.name}: confidence must be one of {CONFIDENCES}, "
                         f"got {self.confidence!r}")
    if self.sharpness <= 0:
      raise DecodingError(f"policy {self.name}: sharpness must be > 0, got {self.sharpness}")
    if not 0 <= self.bridge_noise <= 1:
      raise DecodingError(f"policy {self.name}: bridge_noise must be in [0, 1], got "
                          f"{self.bridge_noise}")
    if not 0 <= self.noise <= 1:
      raise DecodingError(f"policy {self.name}: noise must be in [0, 1], got {self.noise}")
    if not 0 < self.accept_ratio <= 1:
      raise DecodingError(f"policy {self.name}: accept_ratio must be in (0, 1], got "
                          f"{self.accept_ratio}")
    if self.update not in UPDATES:
      raise DecodingError(f"policy {self.name}: update must be one of {UPDATES}, "
                          f"got {self.update!r}")
    if self.readout not in READOUTS:
      raise DecodingError(f"policy {self.name}: readout must be one of {READOUTS}, "
                          f"got {self.readout!r}")
    if self.ramp and (self.adaptive or self.readout == "clean"):
      raise DecodingError(f"policy {self.name}: ramp is a schedule of the fixed steps "
                          f"(readout=latent, not adaptive)")
    if self.readout == "clean" and self.window < 1:
      raise DecodingError(f"policy {self.name}: readout=clean needs window >= 1 (1: no drafts; "
                          f"W: W - 1 drafts a pass from windows of W latents)")

  def resolved_window(self, max_new_tokens):
    return min(self.window or max_new_tokens, max_new_tokens)

  def resolved_n_max(self, max_new_tokens):
    """Iterations after which the leftmost latent is forced. With ramp a latent waits at its
    floor while the ones left of it mature, so the default never forces (W K bounds a wait)."""
    if self.n_max:
      return self.n_max
    return self.steps * (self.resolved_window(max_new_tokens) if self.ramp else 1)

  def describe(self, max_new_tokens):
    """The settings that matter, in a few characters (tables and benchmark rows)."""
    W = self.resolved_window(max_new_tokens)
    if self.readout == "clean":
      carry = f", carried K={self.steps}" + (" adaptive" if self.adaptive else "")
      lenient = f", accept_ratio={self.accept_ratio:g}" if self.accept_ratio < 1 else ""
      return "clean stream" + (f", {W - 1} drafts" + (carry if self.carry else "") + lenient
                               if W > 1 else "")
    ancestral = (" ancestral" + (f" bridge_noise={self.bridge_noise:g}"
                                 if self.bridge_noise != 1 else "")
                 if self.update == "ancestral" else "")
    if self.adaptive:
      return (f"W={W} D=[{self.delta_min:g},{self.delta_max:g}]*c^{self.sharpness:g} "
              f"gamma={self.gamma:g} tau={self.tau_c:g} Nmax={self.resolved_n_max(max_new_tokens)}"
              + (" +t_hat" if self.use_time_head else "") + ancestral)
    return f"W={W} K={self.steps}" + (" ramp" if self.ramp else "") + ancestral


# The defaults were picked by measurement on the 2,000-step tiny run (docs/decoding.md, "The
# speed/quality front"). verify: one-step drafts from t = 1 (carrying the latents over cost
# acceptance there), W = 4 (W = 8 and 16 accept hardly more, at 3.6x and 14x the inputs).
# evo: latents that mature before their neighbours are known cost likelihood, so only
# confident tokens mature fast (sharpness 4) and the time head's push is off; every evo setting
# slower than 1.9 tokens a pass is beaten by verify on both counts, so gamma = 0.1 puts evo at
# the fast end of the front (2.15 tokens a pass). n_max = 1: the leftmost latent commits at
# every pass, so evo never takes more passes than ar.
# block: a rolling front of W = 4 latents (ramp), 2 tokens a pass, each stepped by the
# noise-free ancestral bridge: on the reference run AR-NLL 3.89 at 1.94 tokens a pass, against
# 7.31 at 2.00 for W = 8, K = 4 with the flow (docs/decoding.md, "Refinement on the reference
# run").
POLICIES = {
    "ar": Policy("ar", window=1, steps=1),
    "ar_clean": Policy("ar_clean", window=1, steps=1, readout="clean"),
    "verify": Policy("verify", window=4, steps=1, readout="clean"),
    "diffusion": Policy("diffusion", window=0, steps=16),
    "block": Policy("block", window=4, steps=2, ramp=True, update="ancestral", bridge_noise=0.0),
    "evo": Policy("evo", window=4, steps=1, adaptive=True, delta_min=0.01, sharpness=4.0,
                  gamma=0.1, n_max=1),
}


def make_policy(name, **settings):
  """POLICIES[name] with some settings changed; a one-line DecodingError for a wrong name."""
  if name not in POLICIES:
    raise DecodingError(f"unknown policy {name!r} (expected one of {', '.join(POLICIES)})")
  fields = {f.name: f for f in dataclasses.fields(Policy)}
  for key in settings:
    if key not in fields or key == "name":
      raise DecodingError(f"unknown policy setting {key!r} (expected one of "
                         f"{', '.join(k for k in fields if k != 'name')})")
  return dataclasses.replace(POLICIES[name], **settings)


# ---------------------------------------------------------------------------------------------
# The jitted loop
# ---------------------------------------------------------------------------------------------


def nucleus_logits(logits_BxWxV, temperature, top_p):
  """logits / T, with -inf outside the top-p nucleus (the fewest tokens whose mass reaches
  top_p; always at least one)."""
  scaled = logits_BxWxV / temperature
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs       # mass strictly above each candidate
  n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)   # always >= 1
  cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def choose_tokens(rng, logits_BxWxV, temperature, top_p):
  """Argmax at temperature <= 0; else a sample from the top-p nucleus of softmax(logits / T).
  (lax.cond: greedy decoding never pays for the sort.)"""
  sample = lambda logits: jax.random.categorical(
      rng, nucleus_logits(logits, temperature, top_p), axis=-1).astype(jnp.int32)
  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, sample, greedy, logits_BxWxV)


def sampling_probs(logits_BxWxV, temperature, top_p):
  """The distribution choose_tokens draws from, as probabilities: one-hot at the argmax at
  temperature <= 0, else the renormalised top-p nucleus of softmax(logits / T). (Greedy
  verification is then the speculative-sampling rule on one-hot distributions.)"""
  nucleus = lambda logits: jax.nn.softmax(nucleus_logits(logits, temperature, top_p), axis=-1)
  one_hot = lambda logits: jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
  return jax.lax.cond(temperature > 0, nucleus, one_hot, logits_BxWxV)


def speculative_accept(rng, p_BxWxV, drafts_BxK, q_BxKxV, n_drafts_B, also_ok_BxK=None):
  """The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): draft d_i, drawn
  from q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i)), left to right up to the
  first rejection. p_i is the target distribution at the position of draft i (p has one row
  more, for the position after the last draft). Returns the number accepted, a, and the
  distribution of the next token: normalised max(0, p_a - q_a) after a rejection, p_a when
  every draft was accepted. Each committed token is then distributed exactly as under p, unless
  also_ok (a lossy leniency) lets more drafts pass."""
  B, K = drafts_BxK.shape
  if K == 0:
    return jnp.zeros((B,), jnp.int32), p_BxWxV[:, 0]
  at_draft = lambda x: jnp.take_along_axis(x, drafts_BxK[..., None], axis=-1)[..., 0]
  p_d, q_d = at_draft(p_BxWxV[:, :K]), at_draft(q_BxKxV)
  u = jax.random.uniform(rng, (B, K))
  ok = u * q_d < p_d
  if also_ok_BxK is not None:
    ok = ok | also_ok_BxK
  ok = ok & (jnp.arange(K)[None] < n_drafts_B[:, None])
  n_accept = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
  residual = jnp.pad(jnp.maximum(p_BxWxV[:, :K] - q_BxKxV, 0.0), ((0, 0), (0, 1), (0, 0)))
  at_a = lambda x: jnp.take_along_axis(x, n_accept[:, None, None], axis=1)[:, 0]
  r, p_a = at_a(residual), at_a(p_BxWxV)
  mass = jnp.sum(r, axis=-1, keepdims=True)
  rejected = (n_accept < n_drafts_B)[:, None] & (mass > 0)
  return n_accept, jnp.where(rejected, r / jnp.maximum(mass, 1e-30), p_a)


def verify_inputs(clean_BxW, n_B, n_drafts_B, z_BxKxD, t_BxK, active_B, limit_B, rng, carry):
  """The inputs of one verify pass (readout=clean), for forward_with_cache.

  W clean tokens [pending | drafts 1 .. W - 1] at positions n - 1 + i (causal; their logits
  predict positions n .. n + W - 1), then windows a = 0 .. W - 1 of W latents at positions
  n + a + j. Window a is the case that a drafts are accepted: it sees the pending token and
  drafts 1 .. a, the clean prefix before its window as in training (method.md section 3), and
  its own latents, which enter at t = 1; with `carry`, those at positions n .. n + W - 2 are
  carried over from the previous pass (z, t) instead. Returns (tokens, z, is_latent, t,
  positions, mask); with W = 1 only the pending token (no drafts, no latents).
  """
  B, W = clean_BxW.shape
  j = jnp.arange(W)
  clean_valid = j[None] <= n_drafts_B[:, None]
  cc = (j[:, None] >= j[None, :])[None] & clean_valid[:, None, :]
  pos_c = n_B[:, None] - 1 + j
  if W == 1:
    return clean_BxW, None, None, jnp.zeros((B, 1)), pos_c, cc
  D = z_BxKxD.shape[-1]
  src = j[:, None] + j[None, :]                  # [window a, latent j]: the carried index there
  lat_pos = n_B[:, None, None] + src[None]
  carried = (src < W - 1)[None] & carry
  fresh = schedule.latent_noise(rng, lat_pos.reshape(B, W * W), D).reshape(B, W, W, D)
  z = jnp.where(carried[..., None], z_BxKxD[:, jnp.minimum(src, W - 2)], fresh)
  t = jnp.where(carried, t_BxK[:, jnp.minimum(src, W - 2)], 1.0)
  valid = ((j[None, :, None] <= n_drafts_B[:, None, None]) & (lat_pos < limit_B[:, None, None])
           & active_B[:, None, None]).reshape(B, W * W)
  sees_clean = jnp.repeat(j[None, :] <= j[:, None], W, axis=0)[None] & clean_valid[:, None, :]
  same_window = jnp.repeat(jnp.repeat(jnp.eye(W, dtype=bool), W, axis=0), W, axis=1)
  mask = jnp.concatenate([
      jnp.concatenate([cc, jnp.zeros((B, W, W * W), bool)], axis=2),
      jnp.concatenate([sees_clean, same_window[None] & valid[:, None, :]], axis=2)], axis=1)
  cat = lambda a, b: jnp.concatenate([a, b], axis=1)
  return (cat(clean_BxW, jnp.zeros((B, W * W), jnp.int32)),
          cat(jnp.zeros((B, W, D)), z.reshape(B, W * W, D)),
          cat(jnp.zeros((B, W), bool), jnp.ones((B, W * W), bool)),
          cat(jnp.zeros((B, W)), t.reshape(B, W * W)),
          cat(pos_c, lat_pos.reshape(B, W * W)), mask | jnp.eye(W + W * W, dtype=bool))


def confidence_of(probs_BxWxV, kind):
  if kind == "max":
    return jnp.max(probs_BxWxV, axis=-1)
  entropy = -jnp.sum(probs_BxWxV * jnp.log(jnp.maximum(probs_BxWxV, 1e-30)), axis=-1)
  return 1.0 - entropy / jnp.log(probs_BxWxV.shape[-1])


def ramp_floor(W, K):
  """[W]: the lowest t of window position j under policy.ramp, floor(j K / W) / K: the window
  in K groups of W / K positions (one group when K = 1, so every latent may reach 0)."""
  return jnp.floor(jnp.arange(W) * K / W) / K


def next_times(policy, t_BxW, conf_BxW, t_hat_BxW):
  """t'_i: a fixed step 1/K (no lower than its ramp floor with policy.ramp), or evo's adaptive
  step (and optional re-noising)."""
  if not policy.adaptive:
    t_new = jnp.maximum(0.0, t_BxW - 1.0 / policy.steps)
    if policy.ramp:
      t_new = jnp.maximum(t_new, ramp_floor(t_BxW.shape[1], policy.steps)[None])
    return t_new
  lo, hi = policy.delta_min, policy.delta_max
  delta = lo + (hi - lo) * conf_BxW ** policy.sharpness   # confident tokens mature fast
  if policy.use_time_head:
    delta = jnp.maximum(delta, t_BxW - t_hat_BxW)      # the model says: more mature than t
  t_new = jnp.maximum(0.0, t_BxW - jnp.clip(delta, lo, hi))
  if policy.renoise_below > 0:
    t_new = jnp.where(conf_BxW < policy.renoise_below, jnp.minimum(1.0, t_BxW + lo), t_new)
  return t_new


def step_mask(pend_valid_BxW, valid_BxW):
  """[B, 2W, 2W]: who sees whom among [pending | window] (plus the cache, for all of them).

  The pending tokens are clean and causal among themselves; a latent sees every pending token
  (the committed prefix before its window, as in training) and every latent of the window
  (bidirectional); no clean token sees a latent. Everyone sees itself (no empty softmax row).
  """
  B, W = valid_BxW.shape
  j = jnp.arange(W)
  pp = (j[:, None] >= j[None, :])[None] & pend_valid_BxW[:, None, :]
  zp = jnp.broadcast_to(pend_valid_BxW[:, None, :], (B, W, W))
  zz = jnp.broadcast_to(valid_BxW[:, None, :], (B, W, W))
  mask = jnp.concatenate([jnp.concatenate([pp, jnp.zeros_like(pp)], axis=2),
                          jnp.concatenate([zp, zz], axis=2)], axis=1)
  return mask | jnp.eye(2 * W, dtype=bool)


def flow_update(sched, z_BxWxD, t_BxW, t_new_BxW, e_hat_BxWxD, noise, rng):
  """z <- a(t') e_hat + s(t') eps_hat, with eps_hat = (z - a(t) e_hat) / s(t) the noise that z
  implies (0 once s(t) = 0), optionally mixed with a share of fresh noise."""
  a, s = sched.alpha_sigma(t_BxW)
  a_new, s_new = sched.alpha_sigma(t_new_BxW)
  eps_hat = (z_BxWxD - a[..., None] * e_hat_BxWxD) / jnp.maximum(s, 1e-6)[..., None]
  eps_hat = jnp.where(s[..., None] > 1e-6, eps_hat, 0.0)
  if noise > 0:
    eps_hat = jnp.sqrt(1.0 - noise ** 2) * eps_hat + noise * jax.random.normal(rng, eps_hat.shape)
  return a_new[..., None] * e_hat_BxWxD + s_new[..., None] * eps_hat


def bridge_update(sched, z_BxWxD, t_BxW, t_new_BxW, e_BxWxD, rng, noise=1.0):
  """A draw of z_t' from q(z_t' | z_t, x) for t' < t, the path's posterior given the clean
  latent e = e(x) (VDM, Kingma et al. 2021, eq. 33 with a_t|t' = a_t / a_t'): mean
  (a_t|t' s_t'^2 z_t + a_t' s_t|t'^2 e) / s_t^2, variance s_t|t'^2 s_t'^2 / s_t^2, where
  s_t|t'^2 = s_t^2 - a_t|t'^2 s_t'^2, the noise scaled by `noise`. At t' = 0 it is e itself."""
  a, s = sched.alpha_sigma(t_BxW)
  a_new, s_new = sched.alpha_sigma(t_new_BxW)
  a_ts = a / jnp.maximum(a_new, 1e-6)
  var_ts = jnp.maximum(jnp.square(s) - jnp.square(a_ts * s_new), 0.0)
  s2 = jnp.maximum(jnp.square(s), 1e-12)
  mean = ((a_ts * jnp.square(s_new) / s2)[..., None] * z_BxWxD
          + (a_new * var_ts / s2)[..., None] * e_BxWxD)
  std = jnp.sqrt(var_ts * jnp.square(s_new) / s2)
  if noise == 0:     # a static setting: the noise-free bridge draws nothing
    return mean
  return mean + noise * std[..., None] * jax.random.normal(rng, z_BxWxD.shape)


def latent_update(policy, sched, z_BxWxD, t_BxW, t_new_BxW, logits_BxWxV, e_VxD, rng,
                  temperature, top_p):
  """One step of the window's latents from t to t' (policy.update)."""
  if policy.update == "ancestral":
    k_pick, k_noise = jax.random.split(rng)
    x = choose_tokens(k_pick, logits_BxWxV, temperature, top_p)
    return bridge_update(sched, z_BxWxD, t_BxW, t_new_BxW, e_VxD[x], k_noise,
                         policy.bridge_noise)
  e_hat = jax.nn.softmax(logits_BxWxV, axis=-1) @ e_VxD
  return flow_update(sched, z_BxWxD, t_BxW, t_new_BxW, e_hat, policy.noise, rng)


def scatter_rows(buf_BxS, start_B, values_BxW, count_B):
  """buf[b, start[b] + j] = values[b, j] for j < count[b] (other writes dropped)."""
  B, W = values_BxW.shape[:2]
  j = jnp.arange(W)
  idx = jnp.where(j[None] < count_B[:, None], start_B[:, None] + j[None], buf_BxS.shape[1])
  return buf_BxS.at[jnp.arange(B)[:, None], idx].set(values_BxW, mode="drop")


def _decode(model, params, sched, prompt_BxP, prompt_len_B, limit_B, rng, temperature, top_p,
            eos_id, *, policy, max_new_tokens, record):
  cfg = model.cfg
  B, P = prompt_BxP.shape
  G = max_new_tokens
  S = P + G                                # cache and token buffer length
  W = policy.resolved_window(G)
  n_max = policy.resolved_n_max(G)
  # A commit at least every n_max iterations (verify: at least one token every pass).
  max_iters = G if policy.readout == "clean" else n_max * G
  D = cfg.latent_width
  j_W = jnp.arange(W)
  rows = jnp.arange(B)[:, None]
  e_VxD = model.apply(params, method=EvoTransformer.latent_table)
  apply = functools.partial(model.apply, params, method=EvoTransformer.forward_with_cache)

  def latent_logits(logits, z, t):
    """The latent readout: with model.posterior_logits, plus each latent's own evidence."""
    if not cfg.posterior_logits:
      return logits
    return logits + schedule.posterior_logits(sched, z, t, e_VxD)

  # Prefill: the prompt's clean keys/values, in one causal pass.
  i_P = jnp.arange(P)
  mask = (i_P[:, None] >= i_P[None, :]) & (i_P[None, None, :] < prompt_len_B[:, None, None])
  _, _, (k_new, v_new) = apply(prompt_BxP, None, None, jnp.zeros((B, P)),
                               jnp.broadcast_to(i_P, (B, P)), mask | jnp.eye(P, dtype=bool))
  cache_shape = (cfg.n_layers, B, S) + k_new.shape[3:]
  state = dict(
      i=jnp.zeros((), jnp.int32),
      cache_k=jnp.zeros(cache_shape, k_new.dtype).at[:, :, :P].set(k_new),
      cache_v=jnp.zeros(cache_shape, v_new.dtype).at[:, :, :P].set(v_new),
      n_cached=prompt_len_B,
      pending=jnp.zeros((B, W), jnp.int32), n_pending=jnp.zeros((B,), jnp.int32),
      z=schedule.latent_noise(rng, prompt_len_B[:, None] + j_W, D),
      t=jnp.ones((B, W)), age=jnp.zeros((B, W), jnp.int32),
      tokens=jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_BxP),
      done=prompt_len_B >= limit_B, stop=jnp.zeros((B,), jnp.int32),
      nfe=jnp.zeros((B,), jnp.int32), accepted=jnp.zeros((B,), jnp.int32),
      committed_at=jnp.full((B, G), -1, jnp.int32),
      trajectory=jnp.zeros((max_iters if record else 0, B, G)))
  self_cond = cfg.self_conditioning != "none" and policy.readout == "latent"
  if self_cond:   # each latent's e_hat of the last pass (zeros: none yet)
    state["e_hat"] = jnp.zeros((B, W, D))
  if policy.readout == "clean":
    # The last committed token is pending (fed, not cached): the first pass feeds the prompt's
    # last token, whose keys/values it rewrites. No drafts yet.
    state.update(
        n_cached=prompt_len_B - 1, n_pending=jnp.ones((B,), jnp.int32),
        pending=prompt_BxP[jnp.arange(B), prompt_len_B - 1],
        drafts=jnp.zeros((B, W - 1), jnp.int32), n_drafts=jnp.zeros((B,), jnp.int32),
        draft_probs=jnp.zeros((B, W - 1, cfg.vocab_size)),
        z=schedule.latent_noise(rng, prompt_len_B[:, None] + j_W[:W - 1], D),
        t=jnp.ones((B, W - 1)))

  def verify_body(st):
    """readout=clean: one pass feeds [pending | W - 1 drafts] as clean inputs, and W windows
    of W latents, window a for the case that a drafts are accepted (see verify_inputs). The
    clean stream's next-token logits verify the drafts (the leftmost run that passes the
    speculative-sampling test) and give one more token; the window of the accepted count makes
    the next drafts (and with `carry`, its latents, one step more mature, the next pass's
    windows). With W = 1 there are neither drafts nor latents: AR decoding of the clean
    stream."""
    n = st["n_cached"] + 1                      # committed tokens, the last one pending
    active = ~st["done"]
    nd = st["n_drafts"]
    clean_tok = jnp.concatenate([st["pending"][:, None], st["drafts"]], axis=1)     # [B, W]
    tokens, z, is_latent, t, pos, mask = verify_inputs(
        clean_tok, n, nd, st["z"], st["t"], active, limit_B, rng, policy.carry)
    cache_mask = jnp.arange(S)[None, None, :] < st["n_cached"][:, None, None]
    logits, t_hat, (k_new, v_new) = apply(tokens, z, is_latent, t, pos, mask, st["cache_k"],
                                          st["cache_v"], jnp.broadcast_to(
                                              cache_mask, (B, tokens.shape[1], S)))
    k_accept, k_next, k_draft, k_noise = jax.random.split(
        jax.random.fold_in(jax.random.fold_in(rng, 1), st["i"]), 4)

    # Verification: p is the clean stream's distribution at [n, n + W), q the drafts'.
    p = sampling_probs(logits[:, :W].astype(jnp.float32), temperature, top_p)
    lenient = None
    if policy.accept_ratio < 1 and W > 1:     # greedy only: sampling keeps the exact rule
      probs = jax.nn.softmax(logits[:, :W - 1].astype(jnp.float32), axis=-1)
      p_d = jnp.take_along_axis(probs, st["drafts"][..., None], axis=-1)[..., 0]
      lenient = (p_d >= policy.accept_ratio * jnp.max(probs, axis=-1)) & (temperature <= 0)
    n_accept, next_dist = speculative_accept(k_accept, p, st["drafts"], st["draft_probs"], nd,
                                             lenient)
    next_tok = jax.random.categorical(k_next, jnp.log(next_dist)).astype(jnp.int32)
    committed = jnp.where(j_W[None] < n_accept[:, None],
                          jnp.pad(st["drafts"], ((0, 0), (0, 1))), next_tok[:, None])
    count = jnp.where(active, jnp.minimum(n_accept + 1, limit_B - n), 0)
    is_eos = (committed == eos_id) & (j_W[None] < count[:, None])
    hit_eos = jnp.any(is_eos, axis=1)
    count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, count)

    # The pending token and the accepted drafts (clean inputs 0 .. count - 1) join the cache;
    # the last committed token is the next pending one.
    idx = jnp.where(j_W[None] < count[:, None], st["n_cached"][:, None] + j_W, S)
    write = lambda c, new: c.at[:, rows, idx].set(new[:, :, :W], mode="drop")
    last = jnp.take_along_axis(committed, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    n_new = n + count
    stop = jnp.where(st["done"], st["stop"],
                     jnp.where(hit_eos, 1, jnp.where(n_new >= limit_B, 2, 0)))
    out = dict(st, i=st["i"] + 1, cache_k=write(st["cache_k"], k_new),
               cache_v=write(st["cache_v"], v_new), n_cached=st["n_cached"] + count,
               pending=jnp.where(active, last, st["pending"]),
               tokens=scatter_rows(st["tokens"], n, committed, count),
               committed_at=scatter_rows(st["committed_at"], n - prompt_len_B,
                                         jnp.full((B, W), st["i"]), count),
               done=st["done"] | (stop > 0), stop=stop, nfe=st["nfe"] + active,
               accepted=st["accepted"] + jnp.maximum(count - 1, 0))   # tokens beyond one

    if W > 1:   # the window of the accepted count makes the next drafts
      pick = lambda x: jnp.take_along_axis(
          x.reshape((B, W, W) + x.shape[2:]), n_accept.reshape((B, 1, 1) + (1,) * (x.ndim - 2)),
          axis=1)[:, 0]
      z_w, t_w = pick(z[:, W:]), pick(t[:, W:])
      logits_w = latent_logits(pick(logits[:, W:]), z_w, t_w)
      q = sampling_probs(logits_w[:, 1:].astype(jnp.float32), temperature, top_p)
      out.update(draft_probs=q,
                 drafts=jax.random.categorical(k_draft, jnp.log(q)).astype(jnp.int32),
                 n_drafts=jnp.clip(limit_B - n_new, 0, W - 1))
      if policy.carry:   # ... and its latents, one flow step more mature, the next windows
        probs = jax.nn.softmax(logits_w, axis=-1)
        t_next = next_times(policy, t_w, confidence_of(probs, policy.confidence),
                            pick(t_hat[:, W:]))
        z_next = latent_update(policy, sched, z_w, t_w, t_next, logits_w, e_VxD, k_noise,
                               temperature, top_p)
        out.update(z=z_next[:, 1:], t=t_next[:, 1:])
    if record:   # t of every generated position: 0 committed, the next drafts' t, 1 beyond
      g_G = jnp.arange(G)[None]
      base = jnp.where(g_G < (n_new - prompt_len_B)[:, None], 0.0, 1.0)
      out["trajectory"] = st["trajectory"].at[st["i"]].set(
          scatter_rows(base, n_new - prompt_len_B, out["t"], jnp.full((B,), W - 1)))
    return out

  def body(st):
    n_committed = st["n_cached"] + st["n_pending"]
    win_pos = n_committed[:, None] + j_W                       # [B, W]
    valid = (win_pos < limit_B[:, None]) & ~st["done"][:, None]
    pend_valid = j_W[None] < st["n_pending"][:, None]

    # One forward pass of [pending (clean, t = 0) | window (latents)] against the cache.
    two = lambda a, b: jnp.concatenate([a, b], axis=1)
    cache_mask = jnp.arange(S)[None, None, :] < st["n_cached"][:, None, None]
    logits, t_hat, (k_new, v_new) = apply(
        two(st["pending"], jnp.zeros((B, W), jnp.int32)),
        two(jnp.zeros((B, W, D)), st["z"]),
        two(jnp.zeros((B, W), bool), jnp.ones((B, W), bool)),
        two(jnp.zeros((B, W)), st["t"]),
        two(st["n_cached"][:, None] + j_W, win_pos),
        step_mask(pend_valid, valid), st["cache_k"], st["cache_v"],
        jnp.broadcast_to(cache_mask, (B, 2 * W, S)),
        self_cond_BxTxD=two(jnp.zeros((B, W, D)), st["e_hat"]) if self_cond else None)
    logits, t_hat = latent_logits(logits[:, W:], st["z"], st["t"]), t_hat[:, W:]

    # The pending tokens' keys/values join the cache.
    idx = jnp.where(pend_valid, st["n_cached"][:, None] + j_W, S)
    write = lambda c, new: c.at[:, rows, idx].set(new[:, :, :W], mode="drop")
    cache_k, cache_v = write(st["cache_k"], k_new), write(st["cache_v"], v_new)
    n_cached = n_committed

    # 1-3: confidence, next times, the flow update of the latents.
    k_tok, k_noise = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, 1), st["i"]))
    probs = jax.nn.softmax(logits, axis=-1)
    conf = confidence_of(probs, policy.confidence)
    t_new = next_times(policy, st["t"], conf, t_hat)
    z = latent_update(policy, sched, st["z"], st["t"], t_new, logits, e_VxD, k_noise,
                      temperature, top_p)
    age = st["age"] + 1

    # 4: commit the leftmost run; the leftmost latent is forced after n_max iterations.
    ready = (t_new <= policy.tau_c + T_EPS) | (conf >= policy.gamma)
    ready = ready.at[:, 0].set(ready[:, 0] | (age[:, 0] >= n_max)) & valid
    run = jnp.cumprod(ready.astype(jnp.int32), axis=1).astype(bool)   # the leftmost run
    tok = choose_tokens(k_tok, logits, temperature, top_p)
    is_eos = run & (tok == eos_id)
    hit_eos = jnp.any(is_eos, axis=1)
    n_new = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, jnp.sum(run, axis=1))
    tokens = scatter_rows(st["tokens"], n_committed, tok, n_new)
    committed_at = scatter_rows(st["committed_at"], n_committed - prompt_len_B,
                                jnp.full((B, W), st["i"]), n_new)
    n_committed = n_committed + n_new
    stop = jnp.where(st["done"], st["stop"],
                     jnp.where(hit_eos, 1, jnp.where(n_committed >= limit_B, 2, 0)))

    # 5: the window slides past the committed tokens; new latents enter at t = 1.
    src = j_W[None] + n_new[:, None]
    entering = src >= W
    src = jnp.minimum(src, W - 1)
    slide = lambda x: jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)
    fresh = schedule.latent_noise(rng, n_committed[:, None] + j_W, D)
    z = jnp.where(entering[..., None], fresh, slide(z))
    t = jnp.where(entering, 1.0, slide(t_new))
    age = jnp.where(entering, 0, slide(age))
    extra = {}
    if self_cond:
      extra["e_hat"] = jnp.where(entering[..., None], 0.0, slide(probs @ e_VxD))

    trajectory = st["trajectory"]
    if record:   # t of every generated position: 0 committed, t in the window, 1 not entered
      g_G = jnp.arange(G)[None]
      base = jnp.where(g_G < (n_committed - prompt_len_B)[:, None], 0.0, 1.0)
      row_t = scatter_rows(base, n_committed - prompt_len_B, t, jnp.full((B,), W))
      trajectory = trajectory.at[st["i"]].set(row_t)

    return dict(i=st["i"] + 1, cache_k=cache_k, cache_v=cache_v, n_cached=n_cached,
                pending=tok, n_pending=n_new, z=z, t=t, age=age, tokens=tokens,
                done=st["done"] | (stop > 0), stop=stop, nfe=st["nfe"] + ~st["done"],
                committed_at=committed_at, trajectory=trajectory, accepted=st["accepted"],
                **extra)

  cond = lambda st: (st["i"] < max_iters) & ~jnp.all(st["done"])
  st = jax.lax.while_loop(cond, verify_body if policy.readout == "clean" else body, state)
  return dict(tokens=st["tokens"], length=st["n_cached"] + st["n_pending"], nfe=st["nfe"],
              accepted=st["accepted"],
              stop=st["stop"], committed_at=st["committed_at"], trajectory=st["trajectory"],
              cache_k=st["cache_k"], cache_v=st["cache_v"], n_cached=st["n_cached"])


_decode_jit = jax.jit(_decode, static_argnames=("model", "sched", "policy", "max_new_tokens",
                                                "record"))


def decode_batch(model, params, sched, prompt_BxP, prompt_len_B, limit_B, rng, *, policy,
                 max_new_tokens, temperature=0.0, top_p=1.0, eos_id=-1, record=False):
  """The jitted loop on padded prompts (prompt_BxP, right-padded; prompt_len_B >= 1; the row
  stops at limit_B = prompt length + new tokens at most). Returns a dict of device arrays:
  tokens [B, P + G] (prompt then committed tokens), length [B], nfe [B], stop [B] (1 EOS,
  2 length), committed_at [B, G] (the iteration that committed each new token, -1 never),
  trajectory [iterations, B, G] (with record), and the final cache (cache_k, cache_v,
  n_cached)."""
  return _decode_jit(model, params, sched, jnp.asarray(prompt_BxP, jnp.int32),
                     jnp.asarray(prompt_len_B, jnp.int32), jnp.asarray(limit_B, jnp.int32), rng,
                     jnp.float32(temperature), jnp.float32(top_p), jnp.int32(eos_id),
                     policy=policy, max_new_tokens=max_new_tokens, record=record)


# ---------------------------------------------------------------------------------------------
# The Python interface: lists of token ids in, one result per prompt out
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
  tokens: list                 # the new tokens (EOS included when it stopped there)
  nfe: int                     # forward passes of the decoding loop for this row
  accepted_drafts: int         # readout=clean: accepted drafts, the tokens beyond one a pass
  tokens_per_forward: float
  tokens_per_sec: float        # new tokens of the whole batch / wall time of the batch
  stop_reason: str             # eos | length | context
  seconds: float               # wall time of the batch (compilation excluded)
  trajectory: Optional[np.ndarray] = None   # [nfe, len(tokens)] t after each iteration


_compiled = {}


def _compiled_decode(args, static):
  """An ahead-of-time compiled loop per (shapes, settings), so that timings exclude compiling."""
  key = (tuple((a.shape, a.dtype) for a in args[3:6]), tuple(sorted(static.items())), args[0],
         args[2])
  if key not in _compiled:
    _compiled[key] = _decode_jit.lower(*args, **static).compile()
  return _compiled[key]


def check_prompts(prompts, context):
  for i, ids in enumerate(prompts):
    if len(ids) == 0:
      raise DecodingError(f"prompt {i + 1} is empty")
    if len(ids) >= context:
      raise DecodingError(f"prompt {i + 1} has {len(ids)} tokens but the model's context is "
                         f"{context}: no room to generate")


def generate(model, params, sched, prompts, policy, *, max_new_tokens, context, eos_id,
             temperature=0.0, top_p=1.0, seed=0, record=False):
  """Continues each prompt (a list of token ids) under `policy`, all prompts in one batch.

  A row stops at EOS, after max_new_tokens, or at the model's context. Returns one Sample per
  prompt. Shapes are bucketed (prompt buffer to a multiple of 16) to reuse compilations.
  """
  check_prompts(prompts, context)
  if max_new_tokens < 1:
    raise DecodingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise DecodingError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
  if policy.readout == "clean" and 2 * policy.window - 1 > context:
    raise DecodingError(f"policy {policy.name}: window {policy.window} does not fit the model's "
                        f"context of {context}: its drafts and the window behind them take "
                        f"2 W - 1 = {2 * policy.window - 1} positions")
  B = len(prompts)
  P = -(-max(len(p) for p in prompts) // 16) * 16
  buf = np.zeros((B, P), np.int32)
  for b, ids in enumerate(prompts):
    buf[b, :len(ids)] = ids
  lens = np.asarray([len(p) for p in prompts], np.int32)
  limit = np.minimum(lens + max_new_tokens, context).astype(np.int32)
  args = (model, params, sched, jnp.asarray(buf), jnp.asarray(lens), jnp.asarray(limit),
          jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p), jnp.int32(eos_id))
  static = dict(policy=policy, max_new_tokens=max_new_tokens, record=record)
  compiled = _compiled_decode(args, static)
  start = time.perf_counter()
  out = jax.device_get(compiled(args[1], *args[3:]))
  seconds = time.perf_counter() - start
  n_new = out["length"] - lens
  tps = float(np.sum(n_new)) / max(seconds, 1e-9)
  samples = []
  for b in range(B):
    n, nfe = int(n_new[b]), int(out["nfe"][b])
    reason = STOP_REASONS[int(out["stop"][b])]
    if reason == "length" and limit[b] < lens[b] + max_new_tokens:
      reason = "context"
    traj = out["trajectory"][:nfe, b, :n] if record else None
    samples.append(Sample(tokens=[int(x) for x in out["tokens"][b, lens[b]:lens[b] + n]],
                          nfe=nfe, accepted_drafts=int(out["accepted"][b]),
                          tokens_per_forward=n / max(nfe, 1), tokens_per_sec=tps,
                          stop_reason=reason, seconds=seconds, trajectory=traj))
  return samples


def plot_trajectory(trajectory, path, title=""):
  """A PNG heatmap of t (generated position x iteration): the picture of the evolving balance."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise DecodingError("drawing a trajectory needs matplotlib: pip install -e '.[plot]'") from None
  traj = np.asarray(trajectory)
  fig, ax = plt.subplots(figsize=(min(2 + 0.12 * traj.shape[1], 16), min(1.5 + 0.12 * traj.shape[0], 12)))
  im = ax.imshow(traj, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
  ax.set_xlabel("generated position")
  ax.set_ylabel("iteration (forward pass)")
  ax.set_title(title or "t of each token (0 committed, 1 noise)")
  fig.colorbar(im, ax=ax, label="t")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
