import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from evo_jax import attention
from evo_jax import loss as loss_lib
from evo_jax import model as model_lib
from evo_jax import state as state_lib


forward = jax.jit(loss_lib.two_stream_forward, static_argnums=0)


def make(cfg, seed=0):
  model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
  return model, state_lib.init_params(model, jax.random.key(seed))


def single_doc_batch(cfg, B=2, L=12, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 4, cfg.model.vocab_size)
  return {"tokens": tokens, "segment_ids": jnp.ones((B, L), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(L), (B, L))}


@pytest.mark.parametrize("time_cond", ["adaln", "adaln_lowrank", "add"])
def test_fresh_time_conditioning_is_identity(small_cfg, time_cond):
  """Zero-initialised conditioning: a fresh model's outputs do not depend on t at all."""
  small_cfg.model.time_cond = time_cond
  model, params = make(small_cfg)
  batch = single_doc_batch(small_cfg)
  B, L = batch["tokens"].shape
  z = jax.random.normal(jax.random.key(3), (B, L, small_cfg.model.d_model))
  ones, zeros = jnp.ones((B,), jnp.int32), jnp.zeros((B,), jnp.int32)
  t_rand = jax.random.uniform(jax.random.key(4), (B, L))
  out0 = forward(model, params, batch, z, jnp.zeros((B, L)), 4 * ones, zeros)
  out1 = forward(model, params, batch, z, t_rand, 4 * ones, zeros)
  for a, b in zip(out0, out1):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ar_path_equals_independent_causal_computation(small_cfg):
  """loss.ar_path_forward (W = 1, t = 1, one pass): latent i's logits are next-token prediction
  from the clean prefix, equal to a separate computation that sees only x_<i and one
  pure-noise latent at position i (the same noise: latent_noise of the key and position)."""
  model, params = make(small_cfg, seed=1)
  # Move the time conditioning off zero so that t really matters in this check.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(9), p.shape),
                        params)
  batch = single_doc_batch(small_cfg, B=2, L=10)
  B, L = batch["tokens"].shape
  key = jax.random.key(5)
  _, logits_z = jax.jit(loss_lib.ar_path_forward, static_argnums=0)(model, params, batch, key)
  for n in range(L):
    separate = reference.ar_path_logits_at_jit(model, params, batch["tokens"],
                                               jnp.full((B,), n), key)
    np.testing.assert_allclose(np.asarray(separate), np.asarray(logits_z[:, n]),
                               rtol=1e-5, atol=1e-5)
  # And the clean prefix really matters: another prefix changes the logits at the last position.
  other = batch["tokens"].at[:, 0].set((batch["tokens"][:, 0] + 1) % small_cfg.model.vocab_size)
  changed = reference.ar_path_logits_at_jit(model, params, other, jnp.full((B,), L - 1), key)
  assert not np.allclose(np.asarray(changed), np.asarray(logits_z[:, -1]))


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(small_cfg):
  model32, params = make(small_cfg)
  small_cfg.model.dtype = "bfloat16"
  model16 = model_lib.EvoTransformer(model_lib.from_config(small_cfg.model))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  batch = single_doc_batch(small_cfg)
  B, L = batch["tokens"].shape
  z = jnp.zeros((B, L, small_cfg.model.d_model))
  args = (batch, z, jnp.full((B, L), 0.5), jnp.full((B,), 3), jnp.zeros((B,), jnp.int32))
  l32 = forward(model32, params, *args)[1]
  l16 = forward(model16, params, *args)[1]
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), atol=0.1)


def test_tied_head_and_latent_scale(small_cfg):
  """A clean token enters as its embedding, and a latent e(x) read at rms(E) is the same input."""
  model, params = make(small_cfg)
  E = params["params"]["embedding"]
  e = model.apply(params, method=model_lib.EvoTransformer.latent_table)
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(e)))), 1.0, rtol=1e-5)
  batch = single_doc_batch(small_cfg, B=1, L=6)
  tokens = batch["tokens"]
  mask = attention.causal_mask(batch["segment_ids"])
  t = jnp.zeros((1, 6))
  clean = model.apply(params, tokens, None, None, t, batch["positions"], mask)[0]
  as_latent = model.apply(params, tokens, e[tokens], jnp.ones((1, 6), bool), t,
                          batch["positions"], mask)[0]
  np.testing.assert_allclose(np.asarray(clean), np.asarray(as_latent), rtol=1e-5, atol=1e-5)
  assert E.shape == (small_cfg.model.vocab_size, small_cfg.model.d_model)
  assert "head" not in params["params"]  # tied by default


def test_learned_latent_space_shapes_and_gradients(small_cfg):
  """model.latent_dim = k: e(v) = E[v] P normalised is [V, k] at unit RMS, z is read back by a
  learned [k, D] map, the clean stream is the same network's, and P learns even while the
  embedding's gradient is stopped."""
  small_cfg.model.latent_dim = 8
  model, params = make(small_cfg)
  V, D = small_cfg.model.vocab_size, small_cfg.model.d_model
  p = params["params"]
  assert p["latent_proj"].shape == (D, 8) and p["latent_in"]["kernel"].shape == (8, D)
  e = model.apply(params, method=model_lib.EvoTransformer.latent_table)
  assert e.shape == (V, 8)
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(e)))), 1.0, rtol=1e-5)
  batch = single_doc_batch(small_cfg, B=1, L=6)
  tokens, mask = batch["tokens"], attention.causal_mask(batch["segment_ids"])
  small_cfg.model.latent_dim = 0
  plain = model_lib.from_config(small_cfg.model)
  without = {"params": {k: v for k, v in p.items() if k not in ("latent_proj", "latent_in")}}
  args = (tokens, None, None, jnp.zeros((1, 6)), batch["positions"], mask)
  np.testing.assert_array_equal(model.apply(params, *args)[0],
                                model_lib.EvoTransformer(plain).apply(without, *args)[0])
  is_latent = jnp.ones((1, 6), bool)
  out = model.apply(params, tokens, e[tokens], is_latent, jnp.full((1, 6), 0.5),
                    batch["positions"], mask)[0]
  assert out.shape == (1, 6, V)

  def table_sum(params):
    return jnp.sum(jnp.sin(loss_lib.latent_table(model, params)))

  grads = jax.grad(table_sum)(params)["params"]
  assert not np.any(np.asarray(grads["embedding"]))
  assert np.any(np.asarray(grads["latent_proj"]))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialisation_keeps_the_gradients(small_cfg, remat):
  """Remat trades memory for recomputation; the parameters and gradients stay the same."""
  batch = single_doc_batch(small_cfg, B=2, L=8)
  grads = []
  for policy in ("none", remat):
    small_cfg.model.remat = policy
    model, params = make(small_cfg)
    loss_fn = loss_lib.make_train_loss(model, small_cfg)
    g = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(1), 0)[0]))(params)
    grads.append(g)
  assert jax.tree.structure(grads[0]) == jax.tree.structure(grads[1])
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", [
    dict(scan_layers=True),
    dict(attention="chunked", attention_chunk=8),
    dict(scan_layers=True, attention="chunked", attention_chunk=4, remat="full"),
    dict(scan_layers=True, attention="block_sparse", attention_chunk=4),
])
def test_scan_and_chunked_attention_keep_loss_and_gradients(small_cfg, variant):
  """Scanning over layers (parameters stacked on a `layers` axis), query-chunked attention
  (the mask built a block of rows at a time) and block-sparse attention (the masked key blocks
  skipped) compute the same loss and gradients."""
  seg = jnp.asarray([[1] * 9 + [2] * 5 + [0] * 2, [1] * 16], jnp.int32)
  batch = {"tokens": jax.random.randint(jax.random.key(3), (2, 16), 4, 64),
           "segment_ids": seg, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
  n = small_cfg.model.n_layers

  def loss_and_grads(cfg, params):
    model = model_lib.EvoTransformer(model_lib.from_config(cfg.model))
    loss_fn = loss_lib.make_train_loss(model, cfg)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(1), 0)[0]))(
        params)

  model, params = make(small_cfg)
  loss0, grads0 = loss_and_grads(small_cfg, params)
  small_cfg.model.update(variant)
  if small_cfg.model.scan_layers:
    params = {"params": model_lib.stack_layers(params["params"], n)}
  loss1, grads1 = loss_and_grads(small_cfg, params)
  if small_cfg.model.scan_layers:
    grads1 = {"params": model_lib.unstack_layers(grads1["params"], n)}
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
  assert jax.tree.structure(grads0) == jax.tree.structure(grads1)
  for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
