"""Attention masks of method.md section 3 and the attention call itself.

The training sequence is laid out twice in one attention call of length 2L: the clean stream C
(positions 0..L-1) followed by the latent stream Z (positions L..2L-1). A boolean mask
[B, 2L, 2L] says who may attend to whom; `True` means "may attend".
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from evo_jax.errors import ConfigError


def window_ids(window_size_B, offset_B, seq_len):
  """w(i) = floor((i + o) / W) for every row position i: [B, L]."""
  i_L = jnp.arange(seq_len)
  return (i_L[None, :] + offset_B[:, None]) // window_size_B[:, None]


def same_document(segment_ids_BxL):
  """[B, L, L]: both tokens are real (segment id > 0) and in the same packed document."""
  seg = segment_ids_BxL
  return (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)


class MaskSpec(NamedTuple):
  """Per-position facts from which the two-stream mask follows, a block of queries at a time.

  Passing these instead of the [B, 2L, 2L] array lets `chunked_attention` build only the
  rows it needs: at L = 4096 the full mask alone is 67 MB per example, and its score matrix
  8.6 GB per layer at 32 heads.
  """
  segment_BxT: jax.Array   # packed document id, 0 for padding
  latent_BxT: jax.Array    # True in the latent stream
  order_BxT: jax.Array     # position within its stream
  window_BxT: jax.Array    # window id w(i) (used by latent queries only)

  def rows(self, start, size):
    return MaskSpec(*(jax.lax.dynamic_slice_in_dim(a, start, size, axis=1) for a in self))


class TwoStreamSpec(MaskSpec):
  """A MaskSpec of the [clean stream | latent stream] layout: the type itself says where the
  streams are, which block-sparse attention needs to know before tracing."""


class CausalSpec(MaskSpec):
  """A MaskSpec of the clean stream alone (a causal LM over packed documents)."""


def two_stream_spec(segment_ids_BxL, window_size_B, offset_B):
  """The MaskSpec of the [clean stream | latent stream] layout, length 2L."""
  B, L = segment_ids_BxL.shape
  both = lambda a: jnp.concatenate([a, a], axis=1)
  i_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
  return TwoStreamSpec(both(segment_ids_BxL),
                  jnp.broadcast_to(jnp.arange(2 * L) >= L, (B, 2 * L)),
                  both(i_BxL),
                  both(window_ids(window_size_B, offset_B, L)))


def spec_mask(q: MaskSpec, k: MaskSpec):
  """[B, Tq, Tk]: C_i sees C_j iff j <= i; Z_i sees C_j iff w(j) < w(i); Z_i sees Z_j iff
  w(j) == w(i); C never sees Z; nothing crosses a document boundary. Every token also sees
  itself, so that padding rows (which see nothing else) never produce an all-masked softmax."""
  col = lambda a: a[:, :, None]
  row = lambda a: a[:, None, :]
  doc = (col(q.segment_BxT) == row(k.segment_BxT)) & (col(q.segment_BxT) > 0)
  q_lat, k_lat = col(q.latent_BxT), row(k.latent_BxT)
  cc = ~q_lat & ~k_lat & (row(k.order_BxT) <= col(q.order_BxT))
  zc = q_lat & ~k_lat & (row(k.window_BxT) < col(q.window_BxT))
  zz = q_lat & k_lat & (row(k.window_BxT) == col(q.window_BxT))
  itself = (q_lat == k_lat) & (col(q.order_BxT) == row(k.order_BxT))
  return ((cc | zc | zz) & doc) | itself


def two_stream_mask(segment_ids_BxL, window_size_B, offset_B):
  """The [B, 2L, 2L] mask of the clean/latent layout (see `spec_mask`)."""
  spec = two_stream_spec(segment_ids_BxL, window_size_B, offset_B)
  return spec_mask(spec, spec)


def causal_spec(segment_ids_BxL):
  """The MaskSpec of `causal_mask`: the clean stream alone."""
  B, L = segment_ids_BxL.shape
  return CausalSpec(segment_ids_BxL, jnp.zeros((B, L), bool),
                    jnp.broadcast_to(jnp.arange(L), (B, L)), jnp.zeros((B, L), jnp.int32))


def causal_mask(segment_ids_BxL):
  """[B, L, L] mask of an ordinary causal LM over packed documents (the clean stream alone)."""
  _, L = segment_ids_BxL.shape
  i_L = jnp.arange(L)
  causal_LxL = i_L[:, None] >= i_L[None, :]
  return (causal_LxL[None] & same_document(segment_ids_BxL)) | jnp.eye(L, dtype=bool)[None]


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """Grouped-query attention (N query heads share K key/value heads) under a boolean mask.

  Softmax runs in float32 whatever the compute dtype, so bf16 training keeps stable
  attention weights.
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                      preferred_element_type=jnp.float32) * (H ** -0.5)
  logits = jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
  return out.reshape(B, T, N, H)


# Fused kernels of model.attention and the JAX backends that have them.
KERNEL_BACKENDS = {"cudnn": ("gpu",)}


def check_backend(kind, backend=None):
  """A one-line ConfigError, before anything compiles, for a kernel this backend lacks."""
  backend = backend or jax.default_backend()
  if kind in KERNEL_BACKENDS and backend not in KERNEL_BACKENDS[kind]:
    raise ConfigError(f"model.attention={kind} runs on {' and '.join(KERNEL_BACKENDS[kind])} "
                      f"only, not on this {backend}: use dense, chunked or block_sparse")


def fused_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, implementation="cudnn"):
  """`dot_product_attention` through jax.nn.dot_product_attention: cuDNN's flash attention
  on a GPU (bfloat16/float16 only), with the mask as given (the two-stream mask is not one of
  its built-in causal/padding/window patterns). implementation="xla" runs the same call on
  any backend (the tests compare it with dot_product_attention)."""
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                      mask=mask_BxTxS[:, None], implementation=implementation)


def query_chunk(chunk, length, what="the attention length"):
  """The block size chunked attention uses: `chunk`, or the whole length when shorter."""
  chunk = min(chunk, length)
  if length % chunk:
    raise ConfigError(f"model.attention_chunk={chunk} does not divide {what} {length}")
  return chunk


def chunked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, spec: MaskSpec, chunk):
  """`dot_product_attention` under `spec_mask(spec, spec)`, one block of `chunk` queries at a
  time: each block builds its own mask rows and scores [B, N, chunk, T], and is recomputed in
  the backward pass, so neither the mask nor the full score matrix ever exists. Exact: every
  query row still takes its softmax over all keys."""
  B, T, N, H = q_BxTxNxH.shape
  chunk = query_chunk(chunk, T)

  @jax.checkpoint
  def block(start):
    q = jax.lax.dynamic_slice_in_dim(q_BxTxNxH, start, chunk, axis=1)
    return dot_product_attention(q, k_BxTxKxH, v_BxTxKxH, spec_mask(spec.rows(start, chunk), spec))

  out_CxBxQxNxH = jax.lax.map(block, jnp.arange(0, T, chunk))
  return jnp.moveaxis(out_CxBxQxNxH, 0, 1).reshape(B, T, N, H)


def key_blocks(spec: MaskSpec, start, size):
  """The (start, stop) ranges of keys that queries [start, start + size) may see at all, from
  the layout alone (block-sparse attention computes no others). A clean query sees clean keys
  up to itself; a latent query sees clean keys before it (w(j) < w(i) implies j < i) and the
  latents of its window, which may be any (W = L). Any other spec: every key."""
  T = spec.segment_BxT.shape[1]
  if isinstance(spec, CausalSpec):
    return [(0, start + size)]
  if isinstance(spec, TwoStreamSpec):
    L = T // 2
    if start + size <= L:
      return [(0, start + size)]
    return [(0, start - L + size), (L, T)]
  return [(0, T)]


def block_sparse_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, spec: MaskSpec, chunk):
  """`chunked_attention` that skips the key blocks the layout rules out (key_blocks): for the
  two-stream layout the clean-to-latent quarter and the upper triangles of both clean-key
  quarters, half the scores in all; for a causal spec, the upper triangle. Each query block
  masks what is left as spec_mask says, so the result is the dense one (float rounding
  aside). Blocks are unrolled: their key counts differ, so they cannot share one loop body."""
  B, T, N, H = q_BxTxNxH.shape
  two_streams = isinstance(spec, TwoStreamSpec)   # a block must not straddle the streams
  chunk = query_chunk(chunk, T // 2 if two_streams else T,
                      "the stream length" if two_streams else "the attention length")
  take = lambda a, ranges: jnp.concatenate([a[:, lo:hi] for lo, hi in ranges], axis=1)

  @jax.checkpoint
  def block(q, keys, values, q_spec, k_spec):
    return dot_product_attention(q, keys, values, spec_mask(q_spec, k_spec))

  outs = []
  for start in range(0, T, chunk):
    ranges = key_blocks(spec, start, chunk)
    k_spec = MaskSpec(*(take(a, ranges) for a in spec))
    outs.append(block(q_BxTxNxH[:, start:start + chunk], take(k_BxTxKxH, ranges),
                      take(v_BxTxKxH, ranges), MaskSpec(*spec.rows(start, chunk)), k_spec))
  return jnp.concatenate(outs, axis=1)
