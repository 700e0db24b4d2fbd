"""The masks of method.md section 3, proven by gradients through a real model."""
import jax
import jax.numpy as jnp
import numpy as np

from evo_jax import attention
from evo_jax import model as model_lib
from evo_jax import state as state_lib


def dependency_matrix(cfg, segment_ids, window, offset):
  """dep[i, j] = ||d out_i / d in_j||: which of the 2L inputs each output actually reads.

  Clean inputs are fed as latents at t = 0 (rms(E) * e(x) == E[x]), so every input is a
  continuous vector we can differentiate against.
  """
  model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
  params = state_lib.init_params(model, jax.random.key(0))
  L = segment_ids.shape[1]
  D = cfg.model.d_model
  inputs = jax.random.normal(jax.random.key(1), (1, 2 * L, D))
  t = jnp.concatenate([jnp.zeros((1, L)), jnp.full((1, L), 0.7)], axis=1)
  pos = jnp.tile(jnp.arange(L), 2)[None]
  mask = attention.two_stream_mask(segment_ids, jnp.array([window]), jnp.array([offset]))
  probe = jax.random.normal(jax.random.key(2), (cfg.model.vocab_size,))

  def outputs(x):
    logits, t_hat = model.apply(params, jnp.zeros((1, 2 * L), jnp.int32), x,
                                jnp.ones((1, 2 * L), bool), t, pos, mask)
    return logits[0] @ probe + t_hat[0]

  jac = jax.jit(jax.jacrev(outputs))(inputs)   # [2L, 1, 2L, D]
  return np.asarray(jnp.sqrt(jnp.sum(jac[:, 0] ** 2, axis=-1)))


def expected_dependencies(seg, window, offset):
  """What the rules allow, closed under composition across layers."""
  L = len(seg)
  w = [(i + offset) // window for i in range(L)]
  same = lambda i, j: seg[i] == seg[j] and seg[i] > 0
  dep = np.zeros((2 * L, 2 * L), bool)
  for i in range(L):
    for j in range(L):
      dep[i, j] = j <= i and same(i, j)                 # C_i <- C_j: causal
      dep[L + i, j] = w[j] < w[i] and same(i, j)        # Z_i <- C_j: earlier windows (and
      dep[L + i, L + j] = w[j] == w[i] and same(i, j)   #   their causal past); Z_i <- own window
    dep[i, i] = dep[L + i, L + i] = True                # padding sees only itself
  return dep


def test_masks_by_gradients(small_cfg):
  seg = np.array([1] * 7 + [2] * 6 + [0] * 3)           # two packed documents and padding
  window, offset = 3, 1
  dep = dependency_matrix(small_cfg, jnp.asarray(seg[None]), window, offset)
  want = expected_dependencies(seg, window, offset)
  L = len(seg)
  # Exact zeros where the rules forbid a path, strictly positive where they allow one.
  np.testing.assert_array_equal(dep[~want], 0.0)
  assert np.all(dep[want] > 0)
  # The statements of the issue, read off the same matrix.
  assert np.all(dep[:L, L:] == 0), "clean stream must never depend on latents"
  w = (np.arange(L) + offset) // window
  for i in range(L):
    for j in range(L):
      if w[j] != w[i]:
        assert dep[L + i, L + j] == 0, "latent depends on a latent of another window"
      if w[j] >= w[i] and j != i:
        assert dep[L + i, j] == 0, "latent depends on a clean token at or after its window"
      if seg[i] != seg[j]:
        assert dep[i, j] == dep[L + i, j] == dep[L + i, L + j] == 0, "crosses a document"
  assert np.all(np.triu(dep[:L, :L], 1) == 0), "clean stream must be causal"


def test_full_window_is_bidirectional_diffusion(small_cfg):
  """W >= L: every latent sees every latent of its document and no clean token."""
  seg = np.array([1] * 10)
  dep = dependency_matrix(small_cfg, jnp.asarray(seg[None]), 10, 0)
  assert np.all(dep[10:, 10:] > 0)
  np.testing.assert_array_equal(dep[10:, :10], 0.0)


def test_causal_mask_matches_clean_stream_block():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
  two = attention.two_stream_mask(seg, jnp.array([2]), jnp.array([0]))
  np.testing.assert_array_equal(two[:, :6, :6], attention.causal_mask(seg))


def test_block_sparse_attention_skips_only_masked_blocks():
  """key_blocks never leaves out a key that the mask allows (any window, offset, packing), and
  block-sparse attention equals dense attention under the full mask, for the two-stream layout
  and for the clean stream alone."""
  L, chunk, B, N, K, H = 16, 4, 3, 4, 2, 8
  seg = jnp.asarray([[1] * 9 + [2] * 5 + [0] * 2, [1] * 16, [1] * 3 + [2] * 13], jnp.int32)
  window, offset = jnp.asarray([1, 16, 4]), jnp.asarray([0, 0, 3])
  q, k, v = (jax.random.normal(jax.random.key(i), (B, 2 * L, heads, H))
             for i, heads in enumerate((N, K, K)))
  for spec, T in ((attention.two_stream_spec(seg, window, offset), 2 * L),
                  (attention.causal_spec(seg), L)):
    mask = np.asarray(attention.spec_mask(spec, spec))
    for start in range(0, T, chunk):
      kept = np.zeros(T, bool)
      for lo, hi in attention.key_blocks(spec, start, chunk):
        kept[lo:hi] = True
      assert not np.any(mask[:, start:start + chunk, ~kept])
    dense = jax.jit(attention.dot_product_attention)(q[:, :T], k[:, :T], v[:, :T],
                                                      jnp.asarray(mask))
    sparse = jax.jit(attention.block_sparse_attention, static_argnums=4)(
        q[:, :T], k[:, :T], v[:, :T], spec, chunk)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5, atol=1e-6)
  # The two-stream layout computes 10 of its 16 query x key blocks of 8 (the clean-to-latent
  # quarter and both clean-key upper triangles skipped): 36 of 64 blocks of 4.
  spec = attention.two_stream_spec(seg, window, offset)
  assert sum(hi - lo for s in range(0, 2 * L, chunk)
             for lo, hi in attention.key_blocks(spec, s, chunk)) == 36 * chunk


def test_the_fused_kernel_call_equals_dense_and_is_refused_off_its_backend(
    capsys, tmp_path, stdlib_tokenizer, small_cfg, monkeypatch):
  """model.attention=cudnn calls jax.nn.dot_product_attention with the two-stream mask; run
  with its XLA implementation on this CPU, the call (layout, grouped heads, mask, scale)
  equals dot_product_attention, and the model through it keeps the mask's dependencies
  exactly. Asked for where cuDNN is not, it is one line before anything compiles: training,
  the AOT compiler, the attention benchmark."""
  import functools
  import pytest
  from conftest import one_line_error
  from evo_jax import aot, bench, config, train
  from evo_jax.errors import ConfigError
  L, B, N, K, H = 8, 2, 4, 2, 8
  seg = jnp.asarray([[1] * 5 + [2] * 3, [1] * 8], jnp.int32)
  mask = attention.two_stream_mask(seg, jnp.asarray([2, 8]), jnp.zeros((B,), jnp.int32))
  q, k, v = (jax.random.normal(jax.random.key(i), (B, 2 * L, heads, H))
             for i, heads in enumerate((N, K, K)))
  np.testing.assert_allclose(
      np.asarray(attention.fused_attention(q, k, v, mask, implementation="xla")),
      np.asarray(attention.dot_product_attention(q, k, v, mask)), rtol=1e-5, atol=1e-6)
  monkeypatch.setattr(attention, "fused_attention",
                      functools.partial(attention.fused_attention, implementation="xla"))
  small_cfg.model.update(attention="cudnn", dtype="bfloat16")
  seg = np.array([1] * 7 + [2] * 6 + [0] * 3)
  dep = dependency_matrix(small_cfg, jnp.asarray(seg[None]), 3, 1)
  want = expected_dependencies(seg, 3, 1)
  np.testing.assert_array_equal(dep[~want], 0.0)
  assert np.all(dep[want] > 0)
  monkeypatch.undo()
  if jax.default_backend() == "gpu":    # launch/gpu_check.sh: cuDNN's kernel itself
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    np.testing.assert_allclose(
        np.asarray(attention.fused_attention(qb, kb, vb, mask), np.float32),
        np.asarray(attention.dot_product_attention(qb, kb, vb, mask), np.float32), atol=3e-2)
    return

  cudnn = ["--config.model.attention=cudnn", "--config.model.dtype=bfloat16"]
  one_line_error(capsys, train.main, ["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                                      f"--config.data.tokenizer={stdlib_tokenizer}", *cudnn],
                 "model.attention=cudnn runs on gpu only, not on this cpu")
  one_line_error(capsys, train.main, ["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                                      "--config.model.attention=cudnn"],
                 "needs model.dtype=bfloat16")
  one_line_error(capsys, bench.main, ["attention", "--kinds", "dense,cudnn"],
                 "runs on gpu only, not on this cpu")
  cfg = config.default_config()
  cfg.model.update(attention="cudnn", dtype="bfloat16")
  with pytest.raises(ConfigError, match="runs on gpu only, not on this tpu"):
    aot.run(cfg, "v5p-8")
