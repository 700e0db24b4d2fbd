"""The progression-conditioned Transformer of method.md section 2.

One network reads a sequence in which every position is either a clean token (read as its
embedding E[x]) or a latent z at time t (read as rms(E) * z), conditions every block on the
per-token time t through a zero-initialised adaLN modulation, and returns token logits (tied
head) and the time head's estimate t_hat. Which positions see which is entirely the caller's
mask (see attention.py), so the same module serves training (clean + latent streams), the AR
path and every decoding policy. For decoding, `forward_with_cache` also attends to cached keys
and values of earlier positions and returns those of its inputs (evo_jax/decoding.py keeps the
cache); it shares every parameter with `__call__`, which is it without a cache.

Parameters carry logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, time) so
that sharding rules can place them on a mesh.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evo_jax.errors import ConfigError

from evo_jax import attention
from evo_jax.sharding import constrain

TIME_CONDS = ("adaln", "adaln_lowrank", "add")
LATENT_NORMS = ("global", "per_token")
ATTENTIONS = ("dense", "chunked", "block_sparse", "cudnn")
ROPE_SCALINGS = ("none", "linear", "llama3")
SELF_CONDITIONINGS = ("none", "e_hat")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Rematerialisation: `none` keeps every activation; `full` keeps only each block's input and
# recomputes the rest in the backward pass; `dots` keeps the matmul outputs (no batch dims).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """The model's settings: the `model` section of the config (config.py holds every default and
  its meaning; build one with from_config)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int  # 0: d_model // n_heads
  d_ff: int
  rope_theta: float
  rope_scaling: str  # none | linear | llama3: see rope_frequencies
  rope_factor: float
  rope_low_freq_factor: float  # llama3 only
  rope_high_freq_factor: float  # llama3 only
  rope_original_max_position: int  # llama3 only: the context of the unscaled model
  norm_eps: float
  qkv_bias: bool  # biases on the q, k, v projections (Qwen2)
  qk_norm: bool  # RMSNorm of each query and key head before RoPE (Qwen3)
  time_cond: str
  time_rank: int  # adaln_lowrank only
  time_dim: int  # width of the time embedding c
  fourier_dim: int
  latent_norm: str
  latent_dim: int  # 0: latents as wide as d_model; else E projected by a learned map to this width
  posterior_logits: bool  # latent logits + log N(z; a e(v), s^2): added by loss.py, decoding.py
  self_conditioning: str  # none | e_hat: a latent also reads the model's previous estimate
  tie_embeddings: bool
  dtype: str  # compute dtype; parameters are always float32
  remat: str  # what a block keeps for the backward pass: see REMAT_POLICIES
  scan_layers: bool  # one scanned block (params stacked on a `layers` axis): one compile
  # dense | chunked (blocks of queries, no [B, T, T] mask or scores) | block_sparse (chunked,
  # and the key blocks the layout rules out are never computed: attention.key_blocks) |
  # cudnn (GPU: cuDNN's fused attention under the dense mask, attention.fused_attention)
  attention: str
  attention_chunk: int

  def __post_init__(self):
    if self.time_cond not in TIME_CONDS:
      raise ConfigError(f"model.time_cond must be one of {TIME_CONDS}, got {self.time_cond!r}")
    if self.latent_norm not in LATENT_NORMS:
      raise ConfigError(f"model.latent_norm must be one of {LATENT_NORMS}, got {self.latent_norm!r}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    if self.attention not in ATTENTIONS:
      raise ConfigError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ConfigError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, "
                        f"got {self.rope_scaling!r}")
    if self.self_conditioning not in SELF_CONDITIONINGS:
      raise ConfigError(f"model.self_conditioning must be one of {SELF_CONDITIONINGS}, "
                        f"got {self.self_conditioning!r}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ConfigError("model.attention=cudnn needs model.dtype=bfloat16 (cuDNN's fused "
                        f"attention has no {self.dtype} kernel)")
    if not 0 <= self.latent_dim <= self.d_model:
      raise ConfigError(f"model.latent_dim={self.latent_dim} must be 0 (off) or at most "
                        f"model.d_model={self.d_model}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")

  @property
  def head_size(self):
    return self.head_dim or self.d_model // self.n_heads

  @property
  def latent_width(self):
    """The width of a latent z and of the latent table e(v)."""
    return self.latent_dim or self.d_model

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


# The parameters of the time conditioning and the time head: what a model adapted from a
# pretrained AR model adds to it (its learning-rate group: train.make_optimizer).
TIME_PARAMS = ("time_embed", "time_in", "modulation", "final_modulation", "time_head")


def is_time_param(path):
  """Whether a parameter (its tree path of dict keys) belongs to the time conditioning."""
  return any(getattr(key, "key", None) in TIME_PARAMS for key in path)


def from_config(cfg) -> ModelConfig:
  return ModelConfig(**cfg.to_dict())


def _init(initializer, *names):
  return nn.with_logical_partitioning(initializer, names)


zeros = nn.initializers.zeros_init()


class RMSNorm(nn.Module):
  eps: float = 1e-6
  axis_name: str = "embed"   # the logical name of the normalised (last) axis

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _init(nn.initializers.ones_init(), self.axis_name),
                       (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


def rope_frequencies(cfg):
  """The H/2 rotary frequencies, computed as Hugging Face LLaMA/Qwen compute them: theta's
  geometric series, divided by rope_factor (`linear`), or LLaMA-3's scaling (`llama3`): long
  wavelengths divided by the factor, short ones kept, a smooth blend in between."""
  H = cfg.head_size
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H)
  if cfg.rope_scaling == "linear":
    inv_freq = inv_freq / cfg.rope_factor
  elif cfg.rope_scaling == "llama3":
    wavelen = 2 * math.pi / inv_freq
    old_context = cfg.rope_original_max_position
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old_context / low, inv_freq / cfg.rope_factor,
                        np.where(wavelen < old_context / high, inv_freq, blended))
  return inv_freq.astype(np.float32)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq_F):
  """Rotary embedding, rotating the two halves of each head (the LLaMA/HF layout)."""
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq_F
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxT, cache=None):
    """Attention of the T inputs among themselves and, with a cache, to S earlier positions.

    cache: None, or (k_BxSxKxH, v_BxSxKxH, mask_BxTxS): keys and values (RoPE applied) computed
    earlier, e.g. a decoding prefix, and which of them each input may see. Returns the output
    [B, T, D] and the inputs' own (k_BxTxKxH, v_BxTxKxH), which a decoder caches.
    """
    cfg = self.cfg
    H, N, K = cfg.head_size, cfg.n_heads, cfg.n_kv_heads
    init = nn.initializers.lecun_normal()
    dense = lambda feats, name, names: nn.DenseGeneral(
        feats, use_bias=cfg.qkv_bias, dtype=cfg.compute_dtype, name=name,
        kernel_init=_init(init, *names), bias_init=_init(zeros, *names[1:]))
    q = dense((N, H), "q", ("embed", "heads", "head_dim"))(x_BxTxD)
    k = dense((K, H), "k", ("embed", "kv_heads", "head_dim"))(x_BxTxD)
    v = dense((K, H), "v", ("embed", "kv_heads", "head_dim"))(x_BxTxD)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, axis_name="head_dim", name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, axis_name="head_dim", name="k_norm")(k)
    inv_freq = rope_frequencies(cfg)
    q = apply_rope(q, positions_BxT, inv_freq)
    k = apply_rope(k, positions_BxT, inv_freq)
    keys, values, mask = k, v, mask_BxTxT
    if cache is not None:
      # Keys are stored rotated, so a cached position never needs its RoPE angle again.
      k_BxSxKxH, v_BxSxKxH, mask_BxTxS = cache
      keys = jnp.concatenate([k_BxSxKxH.astype(k.dtype), k], axis=1)
      values = jnp.concatenate([v_BxSxKxH.astype(v.dtype), v], axis=1)
      mask = jnp.concatenate([mask_BxTxS, mask_BxTxT], axis=2)
    if isinstance(mask, attention.MaskSpec) and cfg.attention == "block_sparse":
      out = attention.block_sparse_attention(q, keys, values, mask, cfg.attention_chunk)
    elif isinstance(mask, attention.MaskSpec):
      out = attention.chunked_attention(q, keys, values, mask, cfg.attention_chunk)
    elif cfg.attention == "cudnn":
      out = attention.fused_attention(q, keys, values, mask)
    else:
      out = attention.dot_product_attention(q, keys, values, mask)
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
                          kernel_init=_init(init, "heads", "head_dim", "embed"),
                          name="o")(out)
    return out, (k, v)


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    init = nn.initializers.lecun_normal()
    dense = lambda feats, name, names: nn.Dense(
        feats, use_bias=False, dtype=cfg.compute_dtype, name=name,
        kernel_init=_init(init, *names))
    gate = dense(cfg.d_ff, "gate", ("embed", "mlp"))(x_BxTxD)
    up = dense(cfg.d_ff, "up", ("embed", "mlp"))(x_BxTxD)
    return dense(cfg.d_model, "down", ("mlp", "embed"))(nn.silu(gate) * up)


class TimeEmbedding(nn.Module):
  """c = MLP(Fourier(t)): the per-token time code shared by every block."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, t_BxT):
    cfg = self.cfg
    n = cfg.fourier_dim // 2
    freqs = 2.0 * jnp.pi * jnp.exp(jnp.linspace(0.0, math.log(256.0), n))
    angles = t_BxT[..., None].astype(jnp.float32) * freqs
    feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    init = nn.initializers.lecun_normal()
    h = nn.Dense(cfg.time_dim, kernel_init=_init(init, None, "time"),
                 bias_init=_init(zeros, "time"), name="in")(feats)
    h = nn.Dense(cfg.time_dim, kernel_init=_init(init, None, "time"),
                 bias_init=_init(zeros, "time"), name="out")(nn.silu(h))
    return h


class Modulation(nn.Module):
  """Per-token (shift, scale, gate) triples from c, zero-initialised: identity at init."""
  cfg: ModelConfig
  n_outputs: int

  @nn.compact
  def __call__(self, c_BxTxC):
    cfg = self.cfg
    h = nn.silu(c_BxTxC)
    if cfg.time_cond == "adaln_lowrank":
      h = nn.Dense(cfg.time_rank, use_bias=False, name="down",
                   kernel_init=_init(nn.initializers.lecun_normal(), "time", None))(h)
    out = nn.Dense(self.n_outputs * cfg.d_model, name="proj",
                   kernel_init=_init(zeros, None, "embed"),
                   bias_init=_init(zeros, "embed"))(h)
    return jnp.split(out.astype(cfg.compute_dtype), self.n_outputs, axis=-1)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, c_BxTxC, positions_BxT, mask_BxTxT, cache=None):
    """-> (output [B, T, D], the attention's (k, v) of the T inputs); cache: see Attention."""
    cfg = self.cfg
    if cfg.time_cond == "add":
      mods = [jnp.zeros((), cfg.compute_dtype)] * 6
    else:
      mods = Modulation(cfg, 6, name="modulation")(c_BxTxC)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    # (1 + gate) rather than DiT's gate: a zero-initialised gate must leave the block as it was.
    h = RMSNorm(cfg.norm_eps, name="attn_norm")(x_BxTxD) * (1 + scale1) + shift1
    attn, kv = Attention(cfg, name="attn")(h, positions_BxT, mask_BxTxT, cache)
    x_BxTxD = x_BxTxD + (1 + gate1) * attn
    h = RMSNorm(cfg.norm_eps, name="mlp_norm")(x_BxTxD) * (1 + scale2) + shift2
    return x_BxTxD + (1 + gate2) * SwiGLU(cfg, name="mlp")(h), kv


def stack_layers(params, n_layers):
  """Per-block parameters {block_i: tree} -> the scanned layout {blocks: {block: tree with a
  leading layer axis}} (model.scan_layers); other entries are kept."""
  params = dict(params)
  blocks = [params.pop(f"block_{i}") for i in range(n_layers)]
  params["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
  return params


def unstack_layers(params, n_layers):
  """The inverse of `stack_layers`."""
  params = dict(params)
  stacked = params.pop("blocks")["block"]
  for i in range(n_layers):
    params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


class LayerStep(nn.Module):
  """One block as a step of `nn.scan` over layers: the carry is x, the scanned input is the
  layer's slice of the decoding cache (or None), the rest is the same for every layer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, cache_kv, c_BxTxC, positions_BxT, mask_BxTxT, cache_mask_BxTxS):
    cache = None if cache_kv is None else (*cache_kv, cache_mask_BxTxS)
    x_BxTxD, kv = Block(self.cfg, name="block")(x_BxTxD, c_BxTxC, positions_BxT, mask_BxTxT,
                                                cache)
    return constrain(x_BxTxD, ("batch", "length", "embed")), kv


class EvoTransformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding", _init(nn.initializers.normal(stddev=0.02), "vocab", "embed"),
        (cfg.vocab_size, cfg.d_model))
    self.time_embed = TimeEmbedding(cfg)
    if cfg.time_cond == "add":
      self.time_in = nn.Dense(cfg.d_model, kernel_init=_init(zeros, "time", "embed"),
                              bias_init=_init(zeros, "embed"))
    block = LayerStep if cfg.scan_layers else Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.blocks = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps)
    if cfg.time_cond != "add":
      self.final_modulation = Modulation(cfg, 2)
    if not cfg.tie_embeddings:
      self.head = nn.Dense(cfg.vocab_size, use_bias=False,
                           kernel_init=_init(nn.initializers.lecun_normal(), "embed", "vocab"))
    self.time_head = nn.Dense(1, kernel_init=_init(zeros, "embed", None),
                              bias_init=_init(zeros, None))
    if cfg.latent_dim:
      # The learned latent space: e(v) from E[v] P, and z read back into the residual stream.
      self.latent_proj = self.param("latent_proj", _init(nn.initializers.orthogonal(), "embed",
                                                          None), (cfg.d_model, cfg.latent_dim))
      self.latent_in = nn.Dense(cfg.d_model, use_bias=False,
                                kernel_init=_init(nn.initializers.lecun_normal(), None, "embed"))
    if cfg.self_conditioning != "none":
      # Zero-initialised: a model with it reads its latents as one without it, until trained.
      self.self_cond_in = nn.Dense(cfg.d_model, use_bias=False,
                                   kernel_init=_init(zeros, None, "embed"))

  def read_scale(self):
    """rms(E): latents live at unit scale and are read back at the embedding's scale."""
    return jnp.sqrt(jnp.mean(jnp.square(self.embedding)))

  def latent_table(self, embedding_grad=True):
    """e(v) for every token v: [V, latent_width] float32 (method.md section 1, option
    latent.norm). embedding_grad=False stops the gradient into E (not into model.latent_dim's
    projection, which is there to be learned)."""
    E = self.embedding if embedding_grad else jax.lax.stop_gradient(self.embedding)
    if self.cfg.latent_dim:
      E = E @ self.latent_proj
    if self.cfg.latent_norm == "global":
      return E / jnp.sqrt(jnp.mean(jnp.square(E)))
    return math.sqrt(self.cfg.latent_width) * E / jnp.linalg.norm(E, axis=-1, keepdims=True)

  def unembedding(self):
    """[V, D]: h W^T is the logits, W in the dtype the readout multiplies in (what a
    vocabulary-chunked loss slices: evo_jax/readout.py)."""
    if self.cfg.tie_embeddings:
      return self.embedding.astype(self.cfg.compute_dtype)
    return self.head.variables["params"]["kernel"].T

  def __call__(self, tokens_BxT, latents_BxTxD, is_latent_BxT, t_BxT, positions_BxT, mask_BxTxT,
               self_cond_BxTxD=None, readout=True):
    """Logits [B, T, V] (float32) and t_hat [B, T] for a mixed clean/latent sequence.

    Clean positions read E[token]; latent positions read rms(E) * z (with model.latent_dim:
    rms(E) times a learned map of z from latent_width to d_model), plus (with
    model.self_conditioning) a learned map of rms(E) * self_cond, the model's previous estimate
    e_hat of the clean latent (None: zeros, no estimate yet). latents_BxTxD may be None when no
    position is latent. mask_BxTxT: a boolean [B, T, T] array, or an attention.MaskSpec from
    which the mask follows (model.attention "chunked" then never builds it whole).
    readout=False: the final hidden states [B, T, D] in place of the logits (`unembedding`).
    """
    logits, t_hat, _ = self.forward_with_cache(
        tokens_BxT, latents_BxTxD, is_latent_BxT, t_BxT, positions_BxT, mask_BxTxT,
        self_cond_BxTxD=self_cond_BxTxD, readout=readout)
    return logits, t_hat

  def forward_with_cache(self, tokens_BxT, latents_BxTxD, is_latent_BxT, t_BxT, positions_BxT,
                         mask_BxTxT, cache_k_NxBxSxKxH=None, cache_v_NxBxSxKxH=None,
                         cache_mask_BxTxS=None, self_cond_BxTxD=None, readout=True):
    """__call__ for decoding: the T inputs may also attend to S cached positions.

    The cache holds, for each of the N = n_layers layers, the keys and values (RoPE applied)
    of earlier positions: the committed clean prefix, which is causal and never sees a latent,
    so its keys and values never change once written (method.md section 3). cache_mask_BxTxS
    says which cached positions each input sees. Returns (logits [B, T, V], t_hat [B, T],
    (k_NxBxTxKxH, v_NxBxTxKxH)): the inputs' own per-layer keys and values, so that the
    caller can append the clean ones to its cache. Without a cache this is __call__.
    """
    cfg = self.cfg
    x = jnp.take(self.embedding, tokens_BxT, axis=0)
    if latents_BxTxD is not None:
      z = latents_BxTxD.astype(jnp.float32)
      z = self.read_scale() * (self.latent_in(z) if cfg.latent_dim else z)
      if cfg.self_conditioning != "none":
        sc = (jnp.zeros_like(latents_BxTxD, jnp.float32) if self_cond_BxTxD is None
              else self.read_scale() * self_cond_BxTxD.astype(jnp.float32))
        z = z + self.self_cond_in(sc)
      x = jnp.where(is_latent_BxT[..., None], z, x)
    x = x.astype(cfg.compute_dtype)
    c_BxTxC = self.time_embed(t_BxT)
    if cfg.time_cond == "add":
      x = x + self.time_in(nn.silu(c_BxTxC)).astype(cfg.compute_dtype)
    if isinstance(mask_BxTxT, attention.MaskSpec) and cfg.attention in ("dense", "cudnn"):
      mask_BxTxT = attention.spec_mask(mask_BxTxT, mask_BxTxT)
    x = constrain(x, ("batch", "length", "embed"))
    cache_kv = None
    if cache_k_NxBxSxKxH is not None:
      cache_kv = (cache_k_NxBxSxKxH, cache_v_NxBxSxKxH)
    if cfg.scan_layers:
      x, (k_N, v_N) = self.blocks(x, cache_kv, c_BxTxC, positions_BxT, mask_BxTxT,
                                  cache_mask_BxTxS)
    else:
      ks, vs = [], []
      for i, block in enumerate(self.blocks):
        cache = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i], cache_mask_BxTxS)
        x, (k, v) = block(x, c_BxTxC, positions_BxT, mask_BxTxT, cache)
        x = constrain(x, ("batch", "length", "embed"))
        ks.append(k)
        vs.append(v)
      k_N, v_N = jnp.stack(ks), jnp.stack(vs)
    h = self.final_norm(x)
    if cfg.time_cond != "add":
      shift, scale = self.final_modulation(c_BxTxC)
      h = h * (1 + scale) + shift
    t_hat = jax.nn.sigmoid(self.time_head(h.astype(jnp.float32))[..., 0])
    if not readout:
      return constrain(h, ("batch", "length", "embed")), t_hat, (k_N, v_N)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", h, self.embedding.astype(cfg.compute_dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.head(h).astype(jnp.float32)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits, t_hat, (k_N, v_N)
