"""The training loss's vocabulary readout, whole or a chunk of the vocabulary at a time.

The logits of both streams, [B, 2L, V] in float32, are the largest activation of a step at a
large vocabulary (evo_8b: 128k entries a position, more than its hidden states by 32x). With
loss.vocab_chunk = c > 0 the loss never holds them: the network returns its final hidden
states h, and the cross-entropy and e_hat are reduced over chunks of c tokens in a scan whose
body is recomputed in the backward pass (the blockwise cross-entropy of Levanter, MaxText's
vocabulary tiling), so only [B, T] running sums stay alive per chunk. Equal to the whole
readout to float rounding (tests/test_loss.py).

A Readout is either: `full` logits [B, T, V], or `h` [B, T, D] with the unembedding `W`
[V, D] and an additive `bias(table_chunk)` (the posterior term, which is separable over the
vocabulary), whose sum is the logits.
"""
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class Readout(NamedTuple):
  full: Optional[jax.Array] = None      # [B, T, V] logits
  h: Optional[jax.Array] = None         # [B, T, D] final hidden states
  W: Optional[jax.Array] = None         # [V, D] unembedding, in the dtype the logits use
  table: Optional[jax.Array] = None     # [V, K] latent table, sliced alongside W for `bias`
  bias: Optional[Callable] = None       # table chunk [c, K] -> [B, T, c], or None
  chunk: int = 0


def _chunks(r: Readout, *extra):
  """W, the table and `extra` [V, ...] arrays, each as [V / c, c, ...]."""
  V = r.W.shape[0]
  n = V // r.chunk
  split = lambda a: None if a is None else a.reshape(n, r.chunk, *a.shape[1:])
  return n, split(r.W), split(r.table), [split(a) for a in extra]


def _chunk_logits(r: Readout, W_c, table_c):
  logits = jnp.einsum("btd,cd->btc", r.h.astype(W_c.dtype), W_c,
                      preferred_element_type=jnp.float32)
  return logits if r.bias is None else logits + r.bias(table_c)


def logits(r: Readout):
  """The whole [B, T, V] logits (what a chunked readout avoids; for tests)."""
  if r.full is not None:
    return r.full
  out = jnp.einsum("btd,vd->btv", r.h.astype(r.W.dtype), r.W, preferred_element_type=jnp.float32)
  return out if r.bias is None else out + r.bias(r.table)


def nll(r: Readout, targets_BxT):
  """(-log p(target) [B, T], logsumexp [B, T] for `expected`, or None for whole logits, which
  need none) under the readout's softmax."""
  if r.full is not None:
    return optax.softmax_cross_entropy_with_integer_labels(r.full, targets_BxT), None
  n, W_n, table_n, _ = _chunks(r)
  B, T = targets_BxT.shape

  @jax.checkpoint
  def body(carry, xs):
    m, s, target = carry
    i, W_c, table_c = xs
    l = _chunk_logits(r, W_c, table_c)
    m_new = jnp.maximum(m, jnp.max(l, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(l - m_new[..., None]), axis=-1)
    local = targets_BxT - i * r.chunk
    here = (local >= 0) & (local < r.chunk)
    picked = jnp.take_along_axis(l, jnp.clip(local, 0, r.chunk - 1)[..., None], -1)[..., 0]
    return (m_new, s, target + jnp.where(here, picked, 0.0)), None

  start = (jnp.full((B, T), -jnp.inf), jnp.zeros((B, T)), jnp.zeros((B, T)))
  (m, s, target), _ = jax.lax.scan(body, start, (jnp.arange(n), W_n, table_n))
  lse = m + jnp.log(s)
  return lse - target, lse


def expected(r: Readout, e_VxK, lse_BxT=None):
  """softmax(logits) @ e_VxK: [B, T, K] (e_hat, the model's estimate of the clean latent).
  lse_BxT: the logsumexp from `nll`, if already known (a chunked readout then needs one pass)."""
  if r.full is not None:
    return jax.nn.softmax(r.full, axis=-1) @ e_VxK
  if lse_BxT is None:
    lse_BxT = nll(r, jnp.zeros(r.h.shape[:2], jnp.int32))[1]
  n, W_n, table_n, (e_n,) = _chunks(r, e_VxK)

  @jax.checkpoint
  def body(total, xs):
    W_c, table_c, e_c = xs
    p = jnp.exp(_chunk_logits(r, W_c, table_c) - lse_BxT[..., None])
    return total + p @ e_c, None

  total, _ = jax.lax.scan(body, jnp.zeros(r.h.shape[:2] + e_VxK.shape[1:]), (W_n, table_n, e_n))
  return total
