"""Attention masks of method.md section 3 and the attention call itself.

The training sequence is laid out twice in one attention call of length 2L: the clean stream C
(positions 0..L-1) followed by the latent stream Z (positions L..2L-1). A boolean mask
[B, 2L, 2L] says who may attend to whom; `True` means "may attend".
"""
import jax
import jax.numpy as jnp


def window_ids(window_size_B, offset_B, seq_len):
  """w(i) = floor((i + o) / W) for every row position i: [B, L]."""
  i_L = jnp.arange(seq_len)
  return (i_L[None, :] + offset_B[:, None]) // window_size_B[:, None]


def same_document(segment_ids_BxL):
  """[B, L, L]: both tokens are real (segment id > 0) and in the same packed document."""
  seg = segment_ids_BxL
  return (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)


def two_stream_mask(segment_ids_BxL, window_size_B, offset_B):
  """The [B, 2L, 2L] mask of the clean/latent layout.

  C_i sees C_j iff j <= i; Z_i sees C_j iff w(j) < w(i); Z_i sees Z_j iff w(j) == w(i);
  C never sees Z; nothing crosses a document boundary. Every token also sees itself, so that
  padding rows (which see nothing else) never produce an all-masked softmax.
  """
  _, L = segment_ids_BxL.shape
  doc_BxLxL = same_document(segment_ids_BxL)
  i_L = jnp.arange(L)
  causal_LxL = i_L[:, None] >= i_L[None, :]
  w_BxL = window_ids(window_size_B, offset_B, L)
  cc = causal_LxL[None] & doc_BxLxL
  cz = jnp.zeros_like(cc)
  zc = (w_BxL[:, None, :] < w_BxL[:, :, None]) & doc_BxLxL
  zz = (w_BxL[:, None, :] == w_BxL[:, :, None]) & doc_BxLxL
  mask = jnp.concatenate(
      [jnp.concatenate([cc, cz], axis=2), jnp.concatenate([zc, zz], axis=2)], axis=1)
  return mask | jnp.eye(2 * L, dtype=bool)[None]


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
