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

One iteration is one forward pass of [pending | window] (2W inputs) against the cache:
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
  ar_clean   AR decoding of the clean stream (readout=clean): each pass feeds the last committed
             token as one clean input against the cache and commits the token its next-token
             logits give, with no latent at all; what an imported LLaMA/Qwen computes;
  diffusion  W = the whole generation, K equal steps, everything commits at t = 0;
  block      W = B, K steps per block;
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
  readout: str = "latent"     # latent: commit from the latent stream; clean: from the clean
                              # stream's next-token logits, one clean input a pass (W = 1)

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
    if not 0 <= self.noise <= 1:
      raise DecodingError(f"policy {self.name}: noise must be in [0, 1], got {self.noise}")
    if self.readout not in READOUTS:
      raise DecodingError(f"policy {self.name}: readout must be one of {READOUTS}, "
                          f"got {self.readout!r}")
    if self.readout == "clean" and (self.window, self.steps, self.adaptive) != (1, 1, False):
      raise DecodingError(f"policy {self.name}: readout=clean decodes one token a pass from "
                          f"the clean stream: it needs window=1, steps=1, adaptive=false")

  def resolved_window(self, max_new_tokens):
    return min(self.window or max_new_tokens, max_new_tokens)

  def resolved_n_max(self):
    return self.n_max or self.steps

  def describe(self, max_new_tokens):
    """The settings that matter, in a few characters (tables and benchmark rows)."""
    if self.readout == "clean":
      return "clean stream"
    W = self.resolved_window(max_new_tokens)
    if self.adaptive:
      return (f"W={W} D=[{self.delta_min:g},{self.delta_max:g}]*c^{self.sharpness:g} "
              f"gamma={self.gamma:g} tau={self.tau_c:g} Nmax={self.resolved_n_max()}"
              + (" +t_hat" if self.use_time_head else ""))
    return f"W={W} K={self.steps}"


# The evo defaults were picked by measurement on a tiny run (docs/decoding.md, "How evo's
# settings trade speed for likelihood"): there, latents that mature before their neighbours
# are known cost likelihood, so only confident tokens mature fast (sharpness 4), and the time
# head's push is off (its estimate at t = 1 is about 0.87, which moved every latent forward).
# n_max = 1: the leftmost latent commits at every pass, so evo never takes more passes than ar.
POLICIES = {
    "ar": Policy("ar", window=1, steps=1),
    "ar_clean": Policy("ar_clean", window=1, steps=1, readout="clean"),
    "diffusion": Policy("diffusion", window=0, steps=16),
    "block": Policy("block", window=8, steps=4),
    "evo": Policy("evo", window=4, steps=1, adaptive=True, delta_min=0.01, sharpness=4.0,
                  gamma=0.3, n_max=1),
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


def choose_tokens(rng, logits_BxWxV, temperature, top_p):
  """Argmax at temperature <= 0; else a sample from the top-p nucleus of softmax(logits / T).
  (lax.cond: greedy decoding never pays for the sort.)"""
  def sample(logits):
    scaled = logits / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs       # mass strictly above each candidate
    n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)   # always >= 1
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)
  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, sample, greedy, logits_BxWxV)


def confidence_of(probs_BxWxV, kind):
  if kind == "max":
    return jnp.max(probs_BxWxV, axis=-1)
  entropy = -jnp.sum(probs_BxWxV * jnp.log(jnp.maximum(probs_BxWxV, 1e-30)), axis=-1)
  return 1.0 - entropy / jnp.log(probs_BxWxV.shape[-1])


def next_times(policy, t_BxW, conf_BxW, t_hat_BxW):
  """t'_i: a fixed step 1/K, or evo's adaptive step (and optional re-noising)."""
  if not policy.adaptive:
    return jnp.maximum(0.0, t_BxW - 1.0 / policy.steps)
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
  n_max = policy.resolved_n_max()
  max_iters = n_max * G                    # a commit at least every n_max iterations
  D = cfg.d_model
  j_W = jnp.arange(W)
  rows = jnp.arange(B)[:, None]
  e_VxD = model.apply(params, method=EvoTransformer.latent_table)
  apply = functools.partial(model.apply, params, method=EvoTransformer.forward_with_cache)

  # Prefill: the prompt's clean keys/values, in one causal pass.
  i_P = jnp.arange(P)
  mask = (i_P[:, None] >= i_P[None, :]) & (i_P[None, None, :] < prompt_len_B[:, None, None])
  logits_P, _, (k_new, v_new) = apply(prompt_BxP, None, None, jnp.zeros((B, P)),
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
      nfe=jnp.zeros((B,), jnp.int32),
      committed_at=jnp.full((B, G), -1, jnp.int32),
      trajectory=jnp.zeros((max_iters if record else 0, B, G)))
  if policy.readout == "clean":
    # The clean stream's prediction of the next token; the first comes from the prefill.
    state["next_logits"] = logits_P[jnp.arange(B), prompt_len_B - 1].astype(jnp.float32)

  def clean_body(st):
    """AR decoding of the clean stream, as a causal LM with its cache: commit the token the
    last clean position predicts, and feed it (one clean input against the cache), which
    writes its keys and values and predicts the next. One pass per token."""
    n, active = st["n_cached"], ~st["done"]
    k_tok = jax.random.fold_in(jax.random.fold_in(rng, 1), st["i"])
    tok = choose_tokens(k_tok, st["next_logits"][:, None], temperature, top_p)    # [B, 1]
    cache_mask = jnp.arange(S)[None, None, :] < n[:, None, None]
    logits, _, (k_new, v_new) = apply(
        tok, None, None, jnp.zeros((B, 1)), n[:, None], jnp.ones((B, 1, 1), bool),
        st["cache_k"], st["cache_v"], cache_mask)
    idx = jnp.where(active, n, S)[:, None]
    write = lambda c, new: c.at[:, rows, idx].set(new, mode="drop")
    count = active.astype(jnp.int32)
    n_new = n + count
    stop = jnp.where(st["done"], st["stop"], jnp.where(tok[:, 0] == eos_id, 1,
                                                       jnp.where(n_new >= limit_B, 2, 0)))
    trajectory = st["trajectory"]
    if record:
      done_G = jnp.arange(G)[None] < (n_new - prompt_len_B)[:, None]
      trajectory = trajectory.at[st["i"]].set(jnp.where(done_G, 0.0, 1.0))
    return dict(st, i=st["i"] + 1, cache_k=write(st["cache_k"], k_new),
                cache_v=write(st["cache_v"], v_new), n_cached=n_new,
                tokens=scatter_rows(st["tokens"], n, tok, count),
                committed_at=scatter_rows(st["committed_at"], n - prompt_len_B,
                                          jnp.full((B, 1), st["i"]), count),
                next_logits=logits[:, 0].astype(jnp.float32), done=st["done"] | (stop > 0),
                stop=stop, nfe=st["nfe"] + count, trajectory=trajectory)

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
        jnp.broadcast_to(cache_mask, (B, 2 * W, S)))
    logits, t_hat = logits[:, W:], t_hat[:, W:]

    # The pending tokens' keys/values join the cache.
    idx = jnp.where(pend_valid, st["n_cached"][:, None] + j_W, S)
    write = lambda c, new: c.at[:, rows, idx].set(new[:, :, :W], mode="drop")
    cache_k, cache_v = write(st["cache_k"], k_new), write(st["cache_v"], v_new)
    n_cached = n_committed

    # 1-3: confidence, next times, the flow update of the latents.
    k_tok, k_noise = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, 1), st["i"]))
    probs = jax.nn.softmax(logits, axis=-1)
    conf = confidence_of(probs, policy.confidence)
    e_hat = probs @ e_VxD
    t_new = next_times(policy, st["t"], conf, t_hat)
    z = flow_update(sched, st["z"], st["t"], t_new, e_hat, policy.noise, k_noise)
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

    trajectory = st["trajectory"]
    if record:   # t of every generated position: 0 committed, t in the window, 1 not entered
      g_G = jnp.arange(G)[None]
      base = jnp.where(g_G < (n_committed - prompt_len_B)[:, None], 0.0, 1.0)
      row_t = scatter_rows(base, n_committed - prompt_len_B, t, jnp.full((B,), W))
      trajectory = trajectory.at[st["i"]].set(row_t)

    return dict(i=st["i"] + 1, cache_k=cache_k, cache_v=cache_v, n_cached=n_cached,
                pending=tok, n_pending=n_new, z=z, t=t, age=age, tokens=tokens,
                done=st["done"] | (stop > 0), stop=stop, nfe=st["nfe"] + ~st["done"],
                committed_at=committed_at, trajectory=trajectory)

  cond = lambda st: (st["i"] < max_iters) & ~jnp.all(st["done"])
  st = jax.lax.while_loop(cond, clean_body if policy.readout == "clean" else body, state)
  return dict(tokens=st["tokens"], length=st["n_cached"] + st["n_pending"], nfe=st["nfe"],
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
                          nfe=nfe, tokens_per_forward=n / max(nfe, 1), tokens_per_sec=tps,
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
