"""The objective of method.md section 4 and the likelihood measurements.

- `make_train_loss`: the surrogate being optimised (`ce` or `elbo` weighting of the latent
  stream, the time-head regression, the clean-stream next-token loss, optional flow matching);
- `make_bound`: the variational bound in log-SNR space for the `shared` pattern with window W
  (reconstruction at lambda_max + diffusion integral + prior at lambda_min), in nats per token;
- `ar_path_forward` / `ar_path_nll`: the exact conditional NLL of AR decoding (W = 1, t = 1)
  and the clean-stream next-token NLL.

Per-token quantities are returned as sums with their token counts so that callers can average
over many batches exactly.
"""
import jax
import jax.numpy as jnp
import optax

from evo_jax import attention
from evo_jax import progression
from evo_jax import readout
from evo_jax import schedule as schedule_lib
from evo_jax.errors import ConfigError
from evo_jax.model import EvoTransformer
from evo_jax.sharding import constrain

T_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8)   # lower edges; t == 1 falls in the last bucket
WEIGHTINGS = ("ce", "elbo")


def two_stream_readouts(model, params, batch, z_BxLxD, t_BxL, window_B, offset_B, sched=None,
                        self_cond_BxLxD=None, e_VxD=None, vocab_chunk=0):
  """One attention call over [clean stream | latent stream] (length 2L).

  Returns the clean stream's and the latent stream's readout.Readout (whole logits [B, L, V],
  or with vocab_chunk > 0 hidden states to be read a vocabulary chunk at a time) and the
  latents' t_hat [B, L]. With model.posterior_logits, the latent logits include each latent's
  own log-likelihood under every token (schedule.posterior_logits; it is zero at t = 1, where
  the AR path passes no schedule). self_cond_BxLxD: the latents' self-conditioning input
  (model.self_conditioning; None: zeros). e_VxD: the latent table of the posterior term (None:
  latent_table's, without gradient into the embedding).
  """
  tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  B, L = tokens.shape
  mask = attention.two_stream_spec(seg, window_B, offset_B)
  both = lambda a, b: jnp.concatenate([a, b], axis=1)
  out, t_hat = model.apply(
      params,
      both(tokens, tokens),
      both(jnp.zeros_like(z_BxLxD), z_BxLxD),
      both(jnp.zeros((B, L), bool), jnp.ones((B, L), bool)),
      both(jnp.zeros_like(t_BxL), t_BxL),
      both(pos, pos),
      mask,
      None if self_cond_BxLxD is None else both(jnp.zeros_like(z_BxLxD), self_cond_BxLxD),
      readout=not vocab_chunk)
  bias, table = None, None
  if model.cfg.posterior_logits and sched is not None:
    table = latent_table(model, params) if e_VxD is None else e_VxD
    bias = lambda e_CxD: schedule_lib.posterior_logits(sched, z_BxLxD, t_BxL, e_CxD)
  if not vocab_chunk:
    logits_z = out[:, L:] if bias is None else out[:, L:] + bias(table)
    return readout.Readout(full=out[:, :L]), readout.Readout(full=logits_z), t_hat[:, L:]
  W = model.apply(params, method=EvoTransformer.unembedding)
  return (readout.Readout(h=out[:, :L], W=W, chunk=vocab_chunk),
          readout.Readout(h=out[:, L:], W=W, table=table, bias=bias, chunk=vocab_chunk),
          t_hat[:, L:])


def two_stream_forward(model, params, batch, z_BxLxD, t_BxL, window_B, offset_B, sched=None,
                       self_cond_BxLxD=None, e_VxD=None):
  """two_stream_readouts as whole logits: clean [B, L, V], latent [B, L, V], t_hat [B, L]."""
  r_c, r_z, t_hat = two_stream_readouts(model, params, batch, z_BxLxD, t_BxL, window_B,
                                        offset_B, sched, self_cond_BxLxD, e_VxD)
  return r_c.full, r_z.full, t_hat


def self_conditioned_forward(model, params, batch, z_BxLxD, t_BxL, window_B, offset_B, sched,
                             use_B=None, e_VxD=None, vocab_chunk=0):
  """two_stream_readouts as model.self_conditioning wants it: a first pass gives e_hat (no
  gradient flows back through it), and the second pass reads it as the latents'
  self-conditioning input, on the rows of use_B (all rows when None) and zeros elsewhere.
  Without the option: the one pass. e_VxD, vocab_chunk: as two_stream_readouts'."""
  args = (model, params, batch, z_BxLxD, t_BxL, window_B, offset_B, sched)
  if model.cfg.self_conditioning == "none":
    return two_stream_readouts(*args, e_VxD=e_VxD, vocab_chunk=vocab_chunk)
  _, first, _ = two_stream_readouts(*args, e_VxD=e_VxD, vocab_chunk=vocab_chunk)
  table = latent_table(model, params) if e_VxD is None else e_VxD
  e_hat = jax.lax.stop_gradient(readout.expected(first, table))
  if use_B is not None:
    e_hat = jnp.where(use_B[:, None, None], e_hat, 0.0)
  return two_stream_readouts(*args, self_cond_BxLxD=e_hat, e_VxD=e_VxD, vocab_chunk=vocab_chunk)


def latent_table(model, params, trainable=False):
  """e(v) for all v. Gradients into the embedding are stopped unless `trainable`
  (loss.latent_table_grad): latents are targets and inputs of the path, and a loss that moves
  them may pull the table together; trained, the latent losses also shape the (tied)
  embedding. model.latent_dim's projection always learns from them."""
  return model.apply(params, embedding_grad=trainable, method=EvoTransformer.latent_table)


def token_xent(logits_BxLxV, tokens_BxL):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL)


def predicted_latent(logits_BxLxV, e_VxD):
  """e_hat = sum_v p(v) e(v): the model's mean clean latent."""
  return jax.nn.softmax(logits_BxLxV, axis=-1) @ e_VxD


def loss_mask(batch):
  """Tokens that carry loss: real (segment id > 0) and not prompt (optional `loss_mask`)."""
  mask = batch["segment_ids"] > 0
  if "loss_mask" in batch:
    mask = mask & batch["loss_mask"].astype(bool)
  return mask


def clean_next_token(logits_c_BxLxV, batch):
  """Next-token NLL of the clean stream: C_i predicts x_{i+1} in the same document.
  logits_c_BxLxV: the logits, or the clean stream's readout.Readout.
  Returns (per-token NLL [B, L-1], mask [B, L-1])."""
  tokens, seg = batch["tokens"], batch["segment_ids"]
  r = logits_c_BxLxV
  if not isinstance(r, readout.Readout):
    r = readout.Readout(full=r)
  r = r._replace(full=None if r.full is None else r.full[:, :-1],
                 h=None if r.h is None else r.h[:, :-1])
  nll = readout.nll(r, tokens[:, 1:])[0]
  mask = (seg[:, 1:] == seg[:, :-1]) & loss_mask(batch)[:, 1:]
  return nll, mask


def _masked_sum(x, mask):
  return jnp.sum(jnp.where(mask, x, 0.0))


def sample_draws(rng, cfg, batch, step, t_density=None):
  """Everything random in a training step, drawn for the whole batch at once: per-token times,
  per-sequence window and offset, and the noise. Drawing them before any split into
  micro-batches keeps gradient accumulation equal to one big step (and the stratification of
  t across the whole batch). t_density: the t bins' probabilities (progression.t_base
  adaptive); the draws then also hold each t's density, for the `elbo` weighting."""
  B, L = batch["tokens"].shape
  k_prog, k_eps = jax.random.split(rng)
  t_BxL, window_B, offset_B = progression.sample(k_prog, cfg.progression, B, L, step,
                                                 t_density)
  latent_width = cfg.model.latent_dim or cfg.model.d_model
  eps_BxLxD = jax.random.normal(k_eps, (B, L, latent_width))
  # Its own key (folded in, so the other draws are those of a run without the option).
  self_cond_B = jax.random.bernoulli(jax.random.fold_in(rng, 7), cfg.loss.self_cond_prob, (B,))
  # Sharded like the tokens, so no device holds (or draws) another's rows.
  extra = {}
  if t_density is not None:
    extra["t_pdf"] = constrain(progression.base_density(cfg.progression, t_BxL, t_density),
                               ("batch", "length"))
  return {**extra, "t": constrain(t_BxL, ("batch", "length")),
          "window": constrain(window_B, ("batch",)),
          "offset": constrain(offset_B, ("batch",)),
          "eps": constrain(eps_BxLxD, ("batch", "length", "embed")),
          "self_cond": constrain(self_cond_B, ("batch",))}


def token_counts(batch):
  """The denominators of the loss: tokens with a latent loss, tokens with a clean next-token
  loss. Passed in, so that micro-batch losses add up to the loss of their whole batch."""
  seg = batch["segment_ids"]
  mask = loss_mask(batch)
  clean = (seg[:, 1:] == seg[:, :-1]) & mask[:, 1:]
  return {"latent": jnp.maximum(mask.sum(), 1), "clean": jnp.maximum(clean.sum(), 1)}


def make_train_loss(model, cfg):
  """loss(params, batch, rng, step) -> (scalar loss, aux dict of sums and counts)."""
  loss_on_draws = make_loss_on_draws(model, cfg)

  def loss_fn(params, batch, rng, step):
    return loss_on_draws(params, batch, sample_draws(rng, cfg, batch, step), token_counts(batch))

  return loss_fn


def check_config(cfg):
  """One-line errors for the objective's settings (loss, progression, schedule)."""
  schedule_lib.from_config(cfg.schedule)
  if cfg.loss.weighting not in WEIGHTINGS:
    raise ConfigError(f"loss.weighting must be one of {WEIGHTINGS}, got {cfg.loss.weighting!r}")
  progression.check_config(cfg.progression)
  if not 0 <= cfg.loss.self_cond_prob <= 1:
    raise ConfigError(f"loss.self_cond_prob must be in [0, 1], got {cfg.loss.self_cond_prob}")
  chunk, V = cfg.loss.vocab_chunk, cfg.model.vocab_size
  if chunk < 0 or (chunk and V % chunk):
    raise ConfigError(f"loss.vocab_chunk={chunk} must be 0 (off) or divide "
                      f"model.vocab_size={V}")


def make_loss_on_draws(model, cfg):
  """loss(params, batch, draws, counts) -> (scalar loss, aux): the surrogate for given random
  draws (`sample_draws`), normalised by the given token counts (`token_counts`)."""
  check_config(cfg)
  sched = schedule_lib.from_config(cfg.schedule)
  lcfg = cfg.loss
  # The `elbo` weight explodes at the ends; t is kept inside the bound's log-SNR range.
  t_lo = float(sched.t_from_log_snr(cfg.bound.log_snr_max))
  t_hi = float(sched.t_from_log_snr(cfg.bound.log_snr_min))

  def loss_fn(params, batch, draws, counts):
    tokens = batch["tokens"]
    t_BxL, window_B, offset_B = draws["t"], draws["window"], draws["offset"]
    e_VxD = latent_table(model, params, trainable=lcfg.latent_table_grad)
    e_BxLxD = e_VxD[tokens]
    z_BxLxD = sched.noise(e_BxLxD, t_BxL, draws["eps"])
    read_c, read_z, t_hat = self_conditioned_forward(
        model, params, batch, z_BxLxD, t_BxL, window_B, offset_B, sched, draws["self_cond"],
        e_VxD=e_VxD, vocab_chunk=lcfg.vocab_chunk)

    mask = loss_mask(batch)
    n_tok = counts["latent"]
    ce_BxL, lse_BxL = readout.nll(read_z, tokens)
    needs_mse = lcfg.weighting == "elbo" or lcfg.flow_weight > 0
    if needs_mse:
      e_hat = readout.expected(read_z, e_VxD, lse_BxL)
      mse_BxL = jnp.sum(jnp.square(e_BxLxD - e_hat), axis=-1)
    if lcfg.weighting == "ce":
      main_BxL = ce_BxL
    else:
      tc = jnp.clip(t_BxL, t_lo, t_hi)
      lam, dlam_dt = jax.jvp(sched.log_snr, (tc,), (jnp.ones_like(tc),))
      density = (draws["t_pdf"] if "t_pdf" in draws
                 else progression.base_density(cfg.progression, tc))
      weight = 0.5 * jnp.exp(lam) * jnp.abs(dlam_dt) / density
      main_BxL = jnp.where(t_BxL >= t_hi, 0.0, weight * mse_BxL)
    loss = _masked_sum(main_BxL, mask) / n_tok
    if lcfg.flow_weight > 0:
      # u - u_hat = (a' - s' a / s)(e - e_hat): flow matching is the MSE under this weight.
      tc = jnp.clip(t_BxL, t_lo, t_hi)
      (a, s), (da, ds) = jax.jvp(sched.alpha_sigma, (tc,), (jnp.ones_like(tc),))
      flow_BxL = jnp.square(da - ds * a / s) * mse_BxL
      loss = loss + lcfg.flow_weight * _masked_sum(flow_BxL, mask) / n_tok
    time_err_BxL = jnp.square(t_hat - t_BxL)
    loss = loss + lcfg.time_weight * _masked_sum(time_err_BxL, mask) / n_tok
    clean_nll, clean_mask = clean_next_token(read_c, batch)
    clean_loss = _masked_sum(clean_nll, clean_mask) / counts["clean"]
    if lcfg.clean_ar_weight > 0:
      loss = loss + lcfg.clean_ar_weight * clean_loss

    edges = jnp.asarray(T_BUCKETS)
    bucket_BxL = jnp.sum(t_BxL[..., None] >= edges, axis=-1) - 1
    in_bucket = (bucket_BxL[..., None] == jnp.arange(len(T_BUCKETS))) & mask[..., None]
    aux = {
        "loss": loss,
        "tokens": mask.sum(),
        "ce_sum": _masked_sum(ce_BxL, mask),
        "time_abs_err_sum": _masked_sum(jnp.abs(t_hat - t_BxL), mask),
        "clean_ar_nll": clean_loss,
        "ce_by_t_sum": jnp.sum(jnp.where(in_bucket, ce_BxL[..., None], 0.0), axis=(0, 1)),
        "ce_by_t_count": jnp.sum(in_bucket, axis=(0, 1)),
    }
    n_bins = progression.adaptive_bins(cfg.progression)
    if n_bins:   # what the adaptive t distribution learns from (t = 1 is not its to draw)
      in_bin = ((progression.t_bin(t_BxL, n_bins)[..., None] == jnp.arange(n_bins))
                & (mask & (t_BxL < 1.0))[..., None])
      aux["ce_by_bin_sum"] = jnp.sum(jnp.where(in_bin, ce_BxL[..., None], 0.0), axis=(0, 1))
      aux["ce_by_bin_count"] = jnp.sum(in_bin, axis=(0, 1))
    return loss, aux

  return loss_fn


def gaussian_prior_kl(e_BxLxD, a, s):
  """KL(N(a e, s^2 I) || N(0, I)) per token: the prior term of the bound."""
  D = e_BxLxD.shape[-1]
  return 0.5 * (a ** 2 * jnp.sum(jnp.square(e_BxLxD), -1) + D * (s ** 2 - 1.0 - 2.0 * jnp.log(s)))


def make_bound(model, cfg, window_size, per_token=False):
  """bound(params, batch, rng) -> dict of per-token sums (nats) and the token count; with
  per_token, the diffusion term's draws instead, for a profile of where the bound goes:
  log_snr, t, integrand (1/2 exp(lambda) ||e - e_hat||^2, whose mean over lambda times
  lambda_max - lambda_min is the term), latent_ce (of the token at that draw), latent_only_ce
  (the same for the posterior from the latent alone, uniform prior: what the table allows) and
  mask, [B, L].

  The `shared`-pattern bound with window W (offset 0): every token of a window shares one
  log-SNR lambda ~ U[lambda_min, lambda_max], stratified across the batch. Estimated in
  log-SNR space, 1/2 * int exp(lambda) ||e - e_hat||^2 d lambda, so its variance does not
  depend on the schedule or on how training samples t (method.md section 7).
  """
  sched = schedule_lib.from_config(cfg.schedule)
  lam_min, lam_max = float(cfg.bound.log_snr_min), float(cfg.bound.log_snr_max)
  # The prior term depends only on lambda_min's (a, s) and the latents.
  t_min_noise = sched.t_from_log_snr(lam_max)
  t_max_noise = sched.t_from_log_snr(lam_min)

  def bound_fn(params, batch, rng):
    tokens = batch["tokens"]
    B, L = tokens.shape
    W = L if window_size == -1 else min(window_size, L)
    window_B = jnp.full((B,), W, jnp.int32)
    offset_B = jnp.zeros((B,), jnp.int32)
    k_u, k_eps, k_eps_rec = jax.random.split(rng, 3)
    u_BxL = progression.stratified_uniforms(k_u, B, L, stratified=True)
    start_BxL = attention.window_ids(window_B, offset_B, L) * W
    u_BxL = jnp.take_along_axis(u_BxL, start_BxL, axis=1)
    lam_BxL = lam_min + (lam_max - lam_min) * u_BxL
    t_BxL = sched.t_from_log_snr(lam_BxL)
    e_VxD = latent_table(model, params)
    e_BxLxD = e_VxD[tokens]
    z = sched.noise(e_BxLxD, t_BxL, jax.random.normal(k_eps, e_BxLxD.shape))
    _, read_z, _ = self_conditioned_forward(model, params, batch, z, t_BxL, window_B, offset_B,
                                            sched)
    logits_z = read_z.full
    mse_BxL = jnp.sum(jnp.square(e_BxLxD - predicted_latent(logits_z, e_VxD)), -1)
    diffusion_BxL = 0.5 * (lam_max - lam_min) * jnp.exp(lam_BxL) * mse_BxL
    if per_token:
      latent_only = schedule_lib.posterior_logits(sched, z, t_BxL, e_VxD)
      return {"log_snr": lam_BxL, "t": t_BxL, "integrand": 0.5 * jnp.exp(lam_BxL) * mse_BxL,
              "latent_ce": token_xent(logits_z, tokens),
              "latent_only_ce": token_xent(latent_only, tokens),
              "mask": batch["segment_ids"] > 0}

    t_rec = jnp.full((B, L), t_min_noise)
    z_rec = sched.noise(e_BxLxD, t_rec, jax.random.normal(k_eps_rec, e_BxLxD.shape))
    _, read_rec, _ = self_conditioned_forward(model, params, batch, z_rec, t_rec, window_B,
                                              offset_B, sched)
    recon_BxL = token_xent(read_rec.full, tokens)

    a, s = sched.alpha_sigma(t_max_noise)
    prior_BxL = gaussian_prior_kl(e_BxLxD, a, s)

    mask = batch["segment_ids"] > 0
    sums = {
        "diffusion": _masked_sum(diffusion_BxL, mask),
        "recon": _masked_sum(recon_BxL, mask),
        "prior": _masked_sum(prior_BxL, mask),
    }
    sums["bound"] = sums["diffusion"] + sums["recon"] + sums["prior"]
    sums["tokens"] = mask.sum()
    return sums

  return bound_fn


def ar_path_forward(model, params, batch, noise_key):
  """The AR path of every position in one pass (method.md section 5): the latent stream at
  W = 1, t = 1, each latent the pure noise `schedule.latent_noise(noise_key, its position)` that
  sees only the clean tokens before it, so latent i's logits give log p(x_i | x_<i). Returns
  (clean-stream logits, latent-stream logits), each [B, L, V].

  The one AR-path computation: training's held-out metrics, scoring (evaluate, lm-eval, bench
  decode) and the decoding loop's latents all draw their noise this way, so for the same
  noise key they score the same text with the same numbers, however it is batched or padded.
  """
  tokens = batch["tokens"]
  B, L = tokens.shape
  z = schedule_lib.latent_noise(noise_key, batch["positions"], model.cfg.latent_width)
  ones_B = jnp.ones((B,), jnp.int32)
  logits_c, logits_z, _ = two_stream_forward(
      model, params, batch, z, jnp.ones((B, L), jnp.float32), ones_B, 0 * ones_B)
  return logits_c, logits_z


def ar_path_nll(model, params, batch, noise_key):
  """Sums of the AR-path NLL over all real tokens and of the clean-stream next-token NLL,
  with their counts."""
  logits_c, logits_z = ar_path_forward(model, params, batch, noise_key)
  mask = batch["segment_ids"] > 0
  clean_nll, clean_mask = clean_next_token(logits_c, batch)
  return {
      "ar_nll": _masked_sum(token_xent(logits_z, batch["tokens"]), mask),
      "tokens": mask.sum(),
      "clean_nll": _masked_sum(clean_nll, clean_mask),
      "clean_tokens": clean_mask.sum(),
  }
