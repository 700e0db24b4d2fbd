"""Every setting of a run, with its default. Config files in configs/ start from
`default_config()` and change what their size needs; the command line overrides any field
(`--config.train.steps=100`). The config is saved beside the checkpoints and checked on resume.
"""
import ml_collections

# Fields that may differ when a run is resumed in the same workdir (how long and how often,
# not what is trained).
RESUMABLE_FIELDS = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every",
                    "train.keep_checkpoints", "train.eval_batches", "train.samples",
                    "train.sample_tokens", "train.sample_prompt", "train.record_batches",
                    # What to do about a fault (a diverged run is resumed with another setting).
                    "train.on_nonfinite", "train.nonfinite_skip_limit",
                    # The state restores onto any mesh; the data position of a prepared
                    # corpus onto any number of processes (evo_jax/prepared.py), that of a
                    # raw corpus onto as many as saved it.
                    "mesh.data", "mesh.fsdp", "mesh.tensor",
                    "data.workers")   # reading processes: the data is the same


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=1024, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=0,
      d_ff=384, rope_theta=10000.0, norm_eps=1e-6,
      # RoPE scaling (none | linear | llama3) and its settings, as in Hugging Face configs.
      rope_scaling="none", rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      rope_original_max_position=8192,
      qkv_bias=False,           # q/k/v projection biases (Qwen2)
      qk_norm=False,            # per-head RMSNorm of queries and keys (Qwen3)
      time_cond="adaln",        # adaln | adaln_lowrank | add
      time_rank=64, time_dim=64, fourier_dim=64,
      latent_norm="global",     # global | per_token
      # 0: a latent is as wide as the model and e(v) is E[v] normalised; k > 0: e(v) is
      # E[v] P normalised, P a learned [d_model, k] map trained by the latent losses, and z is
      # read back through a learned [k, d_model] map (issue 13's learned latent space).
      latent_dim=0,
      # Add each latent's Gaussian log-likelihood under every token, log N(z; a(t) e(v), s(t)^2),
      # to its logits (method.md section 8; zero at t = 1, so the AR path is unchanged). On by
      # measurement: the reference run's bounds 2.3x/3.1x -> 1.02x/1.70x the AR path, and both
      # perplexities lower (docs/training.md, "The reference run and its levers").
      posterior_logits=True,
      # none | e_hat: each latent also reads the model's previous estimate of its clean latent
      # (training: on loss.self_cond_prob of the rows, from a first pass without gradient;
      # decoding: the last pass's). Zero-initialised: an imported model is unchanged.
      self_conditioning="none",
      tie_embeddings=True,
      dtype="float32",          # compute dtype (bfloat16 for accelerators); params stay float32
      remat="none",             # none | full | dots: activation memory vs recomputation
      scan_layers=False,        # scan one block over stacked layer params: one compile
      # dense | chunked: queries in blocks, no [B, 2L, 2L] mask | block_sparse: chunked, and
      # the key blocks that the two-stream layout masks whole are skipped (half the scores) |
      # cudnn: GPU only, cuDNN's fused attention under the whole mask (model.dtype=bfloat16)
      attention="dense",
      attention_chunk=512,      # queries per block; must divide 2 x data.seq_len (chunked) or
                                # data.seq_len (block_sparse)
  ))
  # shift 3 beat 1 on the tiny run's held-out AR-path perplexity (docs/training.md, "Choices
  # measured").
  c.schedule = ml_collections.ConfigDict(dict(kind="linear", shift=3.0))
  c.progression = ml_collections.ConfigDict(dict(
      window_sizes=(1, 4, 16, -1),       # -1: the whole sequence (diffusion)
      window_probs=(0.4, 0.2, 0.2, 0.2),
      window_probs_start=(),             # set to start an "evolving balance" curriculum
      curriculum_steps=0,
      pattern_probs=ml_collections.ConfigDict(dict(shared=0.5, ramp=0.25, independent=0.25)),
      t_base="uniform",                  # uniform | logit_normal | adaptive
      logit_normal_mean=0.0, logit_normal_std=1.0,
      # adaptive: t drawn from adaptive_bins equal bins with probability from the running mean
      # latent CE per bin (its rise over the bin before, CDCD's time warping; EMA decay
      # adaptive_decay, kept in the train state), mixed with a uniform share adaptive_floor.
      adaptive_bins=20, adaptive_floor=0.2, adaptive_decay=0.99,
      stratified=True,
      p_t_one=0.3,                       # mass at t = 1, the state decoding starts from
  ))
  c.loss = ml_collections.ConfigDict(dict(
      weighting="ce",        # ce | elbo
      time_weight=0.1,
      clean_ar_weight=1.0,
      flow_weight=0.0,
      self_cond_prob=0.5,    # rows trained with their self-conditioning input (self_conditioning)
      # Train the latent table e(v) = E / rms(E) through the latent losses (the input z, the
      # target, the posterior term), not only the clean stream's loss: the diffusion loss may
      # spread apart tokens whose latents it cannot tell apart. Off: stop-gradient.
      latent_table_grad=False,
      # 0: the loss reads whole [B, 2L, V] float32 logits; c > 0: the network's hidden states,
      # a vocabulary chunk of c entries at a time, so the logits never exist whole (memory at
      # a large vocabulary: evo_jax/readout.py). Must divide model.vocab_size.
      vocab_chunk=0,
  ))
  c.bound = ml_collections.ConfigDict(dict(
      log_snr_min=-12.0, log_snr_max=4.0,   # chosen by measurement: docs/training.md
      windows=(1, -1),       # W values whose shared-pattern bound is logged
  ))
  c.data = ml_collections.ConfigDict(dict(
      # "" = the Python standard library; else files/globs, comma-separated; or directories
      # made by `python -m evo_jax.prepare` (tokenised once; read with a global shuffle)
      corpus="",
      text_field="text",
      # a SentencePiece .model or a Hugging Face tokenizer.json; "": the workdir's own (an
      # imported checkpoint's tokenizer.json), else one trained on the corpus (cached)
      tokenizer="",
      heldout_fraction=0.05,
      seq_len=128,
      batch_size=16,         # global batch
      shuffle_rows=1024,     # packed training rows are shuffled in windows of this many (raw)
      # Prepared corpora only: each directory's share of the training tokens, in data.corpus
      # order (() = in proportion to their sizes), and processes reading documents ahead.
      mixture=(),
      workers=0,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1,
      decay_steps=0,         # length of the cosine decay; 0: train.steps
      b1=0.9, b2=0.95, clip_norm=1.0,
      pretrained_lr_scale=1.0,   # lr multiplier of all but the time parameters (adaptation)
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: the rest
  # Logical axis names of the parameters and main activations (model.py) -> mesh axes. The
  # defaults shard nothing but the batch unless mesh.fsdp or mesh.tensor is > 1.
  c.sharding = ml_collections.ConfigDict(dict(rules=ml_collections.ConfigDict(dict(
      vocab="tensor", embed="fsdp", heads="tensor", kv_heads="tensor", head_dim=None,
      mlp="tensor", time=None, layers=None,
      batch=("data", "fsdp"), length=None,   # activations
  ))))
  c.train = ml_collections.ConfigDict(dict(
      steps=400, log_every=25, eval_every=100, ckpt_every=200, keep_checkpoints=2,
      eval_batches=8, samples=3, sample_tokens=48, sample_prompt="def ",
      grad_accum_steps=1,    # micro-batches per step (gradients summed; same update)
      record_batches=False,  # each process logs hashes of the rows it read (batches/*.jsonl)
      # A step whose loss or gradient norm is NaN/Inf: `stop` the run (one line naming the step
      # and the last finite checkpoint; the non-finite state is never saved), or `skip` its
      # update (the state stays as it was), at most nonfinite_skip_limit times in one run.
      on_nonfinite="stop", nonfinite_skip_limit=20,
  ))
  return c


def flatten(cfg, prefix=""):
  """{'a.b': value} for every leaf of a (nested) ConfigDict or dict."""
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


# Fields whose default changed after they were added: a saved config that predates the field
# ran with this value, not with today's default.
EARLIER_DEFAULTS = {"model.posterior_logits": False}


def saved_defaults():
  """What a field absent from a saved config stood for when that config was saved."""
  return {**flatten(default_config().to_dict()), **EARLIER_DEFAULTS}


def mismatch(saved: dict, current: ml_collections.ConfigDict):
  """The first field (not in RESUMABLE_FIELDS) whose value differs, as (name, saved, current),
  or None. A field the saved config lacks (added to the code since) counts as its default then
  (saved_defaults)."""
  defaults = saved_defaults()
  a, b = flatten(saved), flatten(current.to_dict())
  for name in sorted(set(a) | set(b)):
    if name in RESUMABLE_FIELDS:
      continue
    was, now = a.get(name, defaults.get(name, "<absent>")), b.get(name, "<absent>")
    if was != now:
      return name, was, now
  return None


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (config.json) as a full ConfigDict: fields added to the code since
  the run was saved take the default they had then (saved_defaults)."""
  cfg = default_config()
  present = flatten(saved)
  for name, value in EARLIER_DEFAULTS.items():
    if name not in present:
      section, field = name.rsplit(".", 1)
      cfg[section][field] = value
  merge(cfg, saved)
  return cfg


def merge(cfg, values):
  for key, value in values.items():
    if isinstance(cfg.get(key), ml_collections.ConfigDict) and isinstance(value, dict):
      merge(cfg[key], value)
    else:
      cfg[key] = tuple(value) if isinstance(value, list) else value
