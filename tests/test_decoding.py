"""The decoding loop (evo_jax/decoding.py): exact where the math is exact.

A small random model with its time conditioning moved off zero (so that t and the latents really
matter) decodes prompts of different lengths in one batch; each policy is checked against a
computation that shares nothing with the loop: AR decoding recomputed from scratch without a
cache, the training-time AR path, a fresh encoding of the clean prefix.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from conftest import small_config, small_model
from evo_jax import attention
from evo_jax import decoding
from evo_jax import loss as loss_lib
from evo_jax import model as model_lib
from evo_jax import run as run_lib
from evo_jax import schedule as schedule_lib
from evo_jax import state as state_lib

SCHED = schedule_lib.from_config(small_config().schedule)
PROMPTS = [[5, 9, 12, 7, 30], list(range(10, 19)), [2]]      # three lengths, one batch
G = 12                                                       # new tokens
CONTEXT = 32
MODEL = small_model()    # the model of conftest's model_params


def padded(prompts=PROMPTS, G=G):
  P = 16
  buf = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  lens = np.asarray([len(p) for p in prompts], np.int32)
  return buf, lens, np.minimum(lens + G, CONTEXT)


def run(model_params, policy, prompts=PROMPTS, seed=0, temperature=0.0, top_p=1.0, eos_id=-1,
        record=False, G=G):
  model, params = model_params
  buf, lens, limit = padded(prompts, G)
  out = decoding.decode_batch(model, params, SCHED, buf, lens, limit, jax.random.key(seed),
                             policy=policy, max_new_tokens=G, temperature=temperature,
                             top_p=top_p, eos_id=eos_id, record=record)
  out = jax.device_get(out)
  out["new"] = [list(out["tokens"][b, lens[b]:out["length"][b]]) for b in range(len(prompts))]
  return out


def uncached_greedy(params, prompts, n_new, seed=0):
  """AR decoding recomputed from scratch at every step (reference.ar_path_logits, no cache),
  with the noise the decoding loop gives the latent at each position; all rows step
  together."""
  buf = np.zeros((len(prompts), 16 + n_new), np.int32)
  lens = np.asarray([len(p) for p in prompts])
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  for step in range(n_new):
    logits = reference.ar_path_logits_at_jit(MODEL, params, jnp.asarray(buf),
                                             jnp.asarray(lens + step), jax.random.key(seed))
    buf[np.arange(len(prompts)), lens + step] = np.asarray(jnp.argmax(logits, -1))
  return [list(buf[b, lens[b]:lens[b] + n_new]) for b in range(len(prompts))]


def test_ar_with_cache_equals_uncached_greedy_and_the_ar_path_argmax(model_params):
  out = run(model_params, decoding.POLICIES["ar"])
  assert out["new"] == uncached_greedy(model_params[1], PROMPTS, G)
  np.testing.assert_array_equal(out["nfe"], [G] * len(PROMPTS))
  np.testing.assert_array_equal(out["stop"], [2] * len(PROMPTS))
  # The one-pass AR path of training and scoring (latent stream, W = 1, t = 1, over the final
  # sequence) puts its argmax on every decoded token.
  model, params = model_params
  tokens = jnp.asarray(out["tokens"])
  B, L = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  batch = {"tokens": tokens, "positions": pos,
           "segment_ids": (pos < jnp.asarray(out["length"])[:, None]).astype(jnp.int32)}
  _, logits_z = loss_lib.ar_path_forward(model, params, batch, jax.random.key(0))
  argmax = np.asarray(jnp.argmax(logits_z, -1))
  for b, prompt in enumerate(PROMPTS):
    np.testing.assert_array_equal(argmax[b, len(prompt):out["length"][b]], out["new"][b])


def test_clean_stream_ar_equals_uncached_clean_greedy(model_params):
  """ar_clean is greedy AR decoding of the clean stream with a cache: token for token the
  text a causal recomputation from scratch gives, one pass (NFE) per token, rows of three
  lengths in one batch; and it stops at EOS like any policy."""
  model, params = model_params
  out = run(model_params, decoding.POLICIES["ar_clean"])
  assert out["new"] == reference.clean_greedy(model, params, PROMPTS, G)
  np.testing.assert_array_equal(out["nfe"], [G] * len(PROMPTS))
  np.testing.assert_array_equal(out["committed_at"], np.tile(np.arange(G), (len(PROMPTS), 1)))
  assert out["new"] != run(model_params, decoding.POLICIES["ar"])["new"]   # another readout
  eos = int(out["new"][1][5])
  stopped = run(model_params, decoding.POLICIES["ar_clean"], eos_id=eos)
  for b, new in enumerate(out["new"]):
    expected = new[:new.index(eos) + 1] if eos in new else new
    assert stopped["new"][b] == expected and stopped["nfe"][b] == len(expected)
  with pytest.raises(decoding.DecodingError, match="readout=clean needs window >= 1"):
    decoding.make_policy("ar_clean", window=0)


@pytest.mark.parametrize("settings", [dict(window=4, carry=True, steps=2), dict(window=8)])
def test_greedy_verify_equals_uncached_clean_greedy(model_params, settings):
  """Draft and verify is lossless: token for token the clean stream's greedy text recomputed
  without a cache, for rows of three lengths in one batch, at EOS and length stops; every pass
  commits at least one token, and the tokens beyond one a pass are accepted drafts."""
  model, params = model_params
  policy = decoding.make_policy("verify", **settings)
  window = policy.window
  expected = reference.clean_greedy(model, params, PROMPTS, G)
  out = run(model_params, policy)
  assert out["new"] == expected
  lengths = np.asarray([len(n) for n in out["new"]])
  np.testing.assert_array_equal(lengths, out["nfe"] + out["accepted"])
  assert np.all(out["nfe"] <= G) and np.all(out["nfe"] >= -(-G // window))
  committed = out["committed_at"]
  assert np.all(np.diff(committed, axis=1) >= 0) and np.all(committed[:, -1] == out["nfe"] - 1)
  assert set(np.unique(committed)) == set(range(int(out["nfe"].max())))   # no empty pass
  eos = int(expected[1][5])
  stopped = run(model_params, policy, eos_id=eos)
  for b, new in enumerate(expected):
    want = new[:new.index(eos) + 1] if eos in new else new
    assert stopped["new"][b] == want
    assert decoding.STOP_REASONS[int(stopped["stop"][b])] == ("eos" if eos in new else "length")


def test_lenient_verify_accepts_what_the_ratio_lets_pass(model_params):
  """accept_ratio < 1 is lossy on purpose: with a ratio so small that every draft passes, the
  first pass (no drafts yet) commits one token and every later pass W."""
  out = run(model_params, decoding.make_policy("verify", window=4, accept_ratio=1e-30))
  np.testing.assert_array_equal(out["nfe"], [1 + -(-(G - 1) // 4)] * len(PROMPTS))
  assert all(len(n) == G for n in out["new"])


@pytest.mark.parametrize("policy", [
    decoding.POLICIES["ar"],
    decoding.POLICIES["ar_clean"],
    decoding.make_policy("verify", window=8),      # rejected drafts are not cached (the loop
                                                   # of the greedy test above: compiled once)
    decoding.make_policy("evo", window=4, gamma=0.0)])      # commits 4 tokens per forward
def test_cached_keys_and_values_equal_a_fresh_encoding(model_params, policy):
  model, params = model_params
  out = run(model_params, policy)
  tokens = jnp.asarray(out["tokens"])
  B, L = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = attention.causal_mask(jnp.ones((B, L), jnp.int32))
  _, _, (k, v) = model.apply(params, tokens, None, None, jnp.zeros((B, L)), pos, mask,
                             method=model_lib.EvoTransformer.forward_with_cache)
  for b in range(B):
    n = int(out["n_cached"][b])
    assert out["length"][b] - policy.resolved_window(G) <= n <= out["length"][b]
    # Equal up to float32 rounding (the loop sums attention over [cache | inputs] in pieces):
    # within 1e-5 of the largest value, about 100 float32 ulps.
    for cached, fresh in ((out["cache_k"], k), (out["cache_v"], v)):
      np.testing.assert_allclose(cached[:, b, :n], fresh[:, b, :n], rtol=0,
                                 atol=1e-5 * float(np.max(np.abs(fresh[:, b, :n]))))


def test_evo_without_early_commits_is_one_token_per_forward(model_params):
  """Confidence never high enough, t never low enough: only the forced leftmost commit."""
  out = run(model_params, decoding.make_policy("evo", window=4, gamma=2.0, tau_c=-1.0),
            record=True)
  np.testing.assert_array_equal(out["nfe"], [G] * len(PROMPTS))
  for b in range(len(PROMPTS)):
    np.testing.assert_array_equal(out["committed_at"][b], np.arange(G))
  # The window really evolved: uncommitted latents moved below t = 1 along the way.
  assert np.min(out["trajectory"][:G]) == 0.0 and 0 < np.max(
      np.where(out["trajectory"][:G] < 1, out["trajectory"][:G], 0)) < 1
  # ... and committing whenever confident enough is faster (gamma = 0: the whole window).
  fast = run(model_params, decoding.make_policy("evo", window=4, gamma=0.0))
  np.testing.assert_array_equal(fast["nfe"], [G // 4] * len(PROMPTS))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_evo_with_window_one_equals_ar(model_params, temperature):
  ar = run(model_params, decoding.POLICIES["ar"], temperature=temperature, seed=3)
  evo = run(model_params, decoding.make_policy("evo", window=1), temperature=temperature, seed=3)
  assert evo["new"] == ar["new"]
  np.testing.assert_array_equal(evo["nfe"], ar["nfe"])


def test_diffusion_and_block_forward_counts(model_params):
  K = 5
  out = run(model_params, decoding.make_policy("diffusion", steps=K))
  np.testing.assert_array_equal(out["nfe"], [K] * len(PROMPTS))
  assert all(len(n) == G for n in out["new"])
  np.testing.assert_array_equal(out["committed_at"], K - 1)
  for update in ("flow", "ancestral"):
    out = run(model_params, decoding.make_policy("block", window=4, steps=3, update=update,
                                                 ramp=False))
    np.testing.assert_array_equal(out["nfe"], [3 * G // 4] * len(PROMPTS))
    np.testing.assert_array_equal(out["committed_at"][:, :8],
                                  [[2] * 4 + [5] * 4] * len(PROMPTS))


@pytest.mark.parametrize("K, first_commit, every", [(2, 1, 0.5), (8, 7, 2)])
def test_the_ramp_is_a_rolling_front(model_params, K, first_commit, every):
  """block with ramp, W = 4: the first tokens commit after K passes, then W / K a pass; the
  window's times rise left to right at every pass."""
  out = run(model_params, decoding.make_policy("block", window=4, steps=K, ramp=True),
            record=True)
  expected = first_commit + (np.arange(G) // 2 if every == 0.5 else np.arange(G) * every)
  np.testing.assert_array_equal(out["committed_at"], [expected] * len(PROMPTS))
  np.testing.assert_array_equal(out["nfe"], [expected[-1] + 1] * len(PROMPTS))
  assert np.all(np.diff(out["trajectory"], axis=2) >= 0)


def test_self_conditioning_starts_as_nothing_and_feeds_the_last_estimate(model_params):
  """model.self_conditioning adds a zero-initialised map of each latent's last e_hat: with the
  map at zero, decoding gives the text of the model without the option, exactly; with the map
  moved off zero, the estimates fed back change the text."""
  model, params = model_params
  with_sc = model_lib.EvoTransformer(dataclasses.replace(model.cfg, self_conditioning="e_hat"))
  D = model.cfg.d_model
  fresh = state_lib.init_params(with_sc, jax.random.key(0))
  assert fresh["params"]["self_cond_in"]["kernel"].shape == (D, D)
  assert not np.any(fresh["params"]["self_cond_in"]["kernel"])
  policy = decoding.make_policy("block", window=4, steps=3)
  plain = run(model_params, policy)
  zero = {"params": {**params["params"], "self_cond_in": {"kernel": jnp.zeros((D, D))}}}
  assert run((with_sc, zero), policy)["new"] == plain["new"]
  moved = {"params": {**params["params"], "self_cond_in": {
      "kernel": 2.0 * jax.random.normal(jax.random.key(5), (D, D)) / np.sqrt(D)}}}
  assert run((with_sc, moved), policy)["new"] != plain["new"]


def test_the_ancestral_bridge_keeps_the_paths_marginal():
  """z_t = a(t) e + s(t) eps, then z_t' drawn from q(z_t' | z_t, x): over many draws z_t' has
  the path's own marginal at t', mean a(t') e and variance s(t')^2 per dimension; at t' = 0 it
  is e exactly; with no fresh noise (bridge_noise = 0) it stays on the noise-free line."""
  sched = schedule_lib.Schedule("linear", 3.0)
  n, D = 20000, 16
  e = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 1, D)), (n, 1, D))
  t = jnp.full((n, 1), 0.8)
  z = sched.noise(e, t, jax.random.normal(jax.random.key(1), (n, 1, D)))
  z_new = decoding.bridge_update(sched, z, t, jnp.full((n, 1), 0.5), e, jax.random.key(2))
  a, s = (float(x) for x in sched.alpha_sigma(jnp.float32(0.5)))
  a_t = float(sched.alpha_sigma(jnp.float32(0.8))[0])
  np.testing.assert_allclose(np.mean(z_new, 0), a * e[0], atol=5 * s / np.sqrt(n))
  np.testing.assert_allclose(np.var(z_new, 0), s * s, rtol=0.05)
  at_zero = decoding.bridge_update(sched, z, t, jnp.zeros((n, 1)), e, jax.random.key(3))
  np.testing.assert_allclose(at_zero, e, atol=1e-6)
  # bridge_noise = 0: the bridge's mean, which from a noise-free a(t) e is a(t') e.
  mean = decoding.bridge_update(sched, a_t * e[:1], t[:1], jnp.full((1, 1), 0.5), e[:1],
                                jax.random.key(4), noise=0.0)
  np.testing.assert_allclose(mean, a * e[:1], rtol=1e-5, atol=1e-6)


def test_eos_and_context_stops(model_params):
  ref = run(model_params, decoding.POLICIES["ar"])
  eos = int(ref["new"][0][3])             # make row 0's fourth token the end of sequence
  out = run(model_params, decoding.POLICIES["ar"], eos_id=eos)
  for b in range(len(PROMPTS)):
    expected = ref["new"][b][:ref["new"][b].index(eos) + 1] if eos in ref["new"][b] else ref["new"][b]
    assert out["new"][b] == expected
    assert decoding.STOP_REASONS[int(out["stop"][b])] == ("eos" if eos in ref["new"][b] else "length")
    assert out["nfe"][b] == len(expected)
  model, params = model_params
  samples = decoding.generate(model, params, SCHED, [list(range(4, 4 + CONTEXT - 3)), [4, 5]],
                             decoding.POLICIES["evo"], max_new_tokens=G, context=CONTEXT,
                             eos_id=-1)
  assert [len(s.tokens) for s in samples] == [3, G]
  assert [s.stop_reason for s in samples] == ["context", "length"]


def test_batched_prompts_decode_as_if_alone(model_params):
  """Rows of different lengths share nothing. (Between batch sizes XLA's float32 rounding may
  differ by an ulp, which argmax absorbs but evo's iterated thresholds need not: evo is compared
  at the same batch shape, with the other rows changed.)"""
  batch = run(model_params, decoding.POLICIES["ar"])
  for b, prompt in enumerate(PROMPTS):
    alone = run(model_params, decoding.POLICIES["ar"], prompts=[prompt])
    assert alone["new"][0] == batch["new"][b]
  policy = decoding.make_policy("evo", window=4)
  batch = run(model_params, policy)
  others = run(model_params, policy, prompts=[PROMPTS[0], [40, 41], list(range(20, 34))])
  assert others["new"][0] == batch["new"][0] and others["nfe"][0] == batch["nfe"][0]
  assert others["new"][1:] != batch["new"][1:]


def test_fixed_seed_is_reproducible(model_params):
  policy = decoding.make_policy("evo", window=4)
  a = run(model_params, policy, seed=7, temperature=1.0, top_p=0.9)
  b = run(model_params, policy, seed=7, temperature=1.0, top_p=0.9)
  c = run(model_params, policy, seed=8, temperature=1.0, top_p=0.9)
  assert a["new"] == b["new"]
  assert a["new"] != c["new"]


def test_choose_tokens_greedy_top_p_and_temperature():
  logits = jnp.log(jnp.asarray([0.1, 0.5, 0.3, 0.1]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k, T, p: decoding.choose_tokens(k, logits[None, None], T, p)[0, 0],
                          in_axes=(0, None, None)))
  assert set(np.asarray(draw(keys, 0.0, 1.0)).tolist()) == {1}        # temperature 0: argmax
  assert set(np.asarray(draw(keys, 1.0, 1e-6)).tolist()) == {1}       # a nucleus of one
  top = np.bincount(np.asarray(draw(keys, 1.0, 0.75)), minlength=4) / len(keys)
  assert top[0] == 0 and top[3] == 0                                  # outside the top 0.8
  np.testing.assert_allclose(top[1:3], [0.625, 0.375], atol=0.03)
  full = np.bincount(np.asarray(draw(keys, 1.0, 1.0)), minlength=4) / len(keys)
  np.testing.assert_allclose(full, [0.1, 0.5, 0.3, 0.1], atol=0.03)


def test_trajectory_heatmap(model_params, tmp_path):
  model, params = model_params
  [s] = decoding.generate(model, params, SCHED, [PROMPTS[0]], decoding.POLICIES["evo"],
                         max_new_tokens=G, context=CONTEXT, eos_id=-1, record=True)
  assert s.trajectory.shape == (s.nfe, len(s.tokens))
  assert np.all(s.trajectory[-1] == 0.0)                             # all committed at the end
  decoding.plot_trajectory(s.trajectory, tmp_path / "t.png")
  assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_one_line_error(model_params):
  model, params = model_params
  gen = lambda prompts, policy=decoding.POLICIES["ar"], **kw: decoding.generate(
      model, params, SCHED, prompts, policy, context=CONTEXT, eos_id=-1,
      **{"max_new_tokens": 4, **kw})
  no_clean_readout = small_config()
  no_clean_readout.loss.clean_ar_weight = 0.0
  unready = run_lib.Run("runs/x", no_clean_readout, model, params, None, 10)
  cases = [
      (lambda: decoding.make_policy("beam"), "unknown policy 'beam'"),
      (lambda: decoding.make_policy("evo", windw=3), "unknown policy setting 'windw'"),
      (lambda: decoding.make_policy("evo", delta_min=0.0), "delta_min"),
      (lambda: decoding.make_policy("verify", accept_ratio=0.0), "accept_ratio"),
      (lambda: decoding.make_policy("block", update="snap"), "update must be one of"),
      (lambda: decoding.make_policy("evo", ramp=True), "ramp is a schedule of the fixed"),
      (lambda: decoding.make_policy("block", bridge_noise=2.0), "bridge_noise must be in"),
      (lambda: gen([[]]), "prompt 1 is empty"),
      (lambda: gen([[4], list(range(CONTEXT))]), "prompt 2 has 32 tokens"),
      (lambda: gen([[4]], max_new_tokens=0), "max_new_tokens"),
      (lambda: gen([[4]], top_p=0.0), "top_p"),
      (lambda: gen([[4]], decoding.make_policy("verify", window=17)),
       "window 17 does not fit the model's context of 32"),
      (lambda: unready.check_policy(decoding.POLICIES["verify"]),
       "which the run in runs/x did not train (its loss.clean_ar_weight is 0)"),
  ]
  unready.check_policy(decoding.POLICIES["evo"])         # the latent readout needs no clean loss
  for fn, fragment in cases:
    with pytest.raises(decoding.DecodingError) as e:
      fn()
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_scanned_layers_decode_the_same(model_params):
  """With model.scan_layers the per-layer cache is the scan's input: the same tokens."""
  model, params = model_params
  scanned = model_lib.EvoTransformer(dataclasses.replace(model.cfg, scan_layers=True))
  stacked = {"params": model_lib.stack_layers(params["params"], model.cfg.n_layers)}
  a = run((model, params), decoding.POLICIES["evo"])
  b = run((scanned, stacked), decoding.POLICIES["evo"])
  assert a["new"] == b["new"] and list(a["nfe"]) == list(b["nfe"])


def ar_sampling_probs(model, params, prompt, n_new, temperature, top_p):
  """The exact probability of every continuation of n_new tokens under AR sampling of the clean
  stream (softmax(logits / T), cut to its top-p nucleus and renormalised), by enumeration."""
  V = model.cfg.vocab_size
  seqs = np.asarray(list(np.ndindex(*(V,) * n_new)), np.int32)           # [V^n, n]
  tokens = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
  logits = np.asarray(reference.clean_logits(model, params, jnp.asarray(tokens)), np.float64)
  probs = np.ones(len(seqs))
  for g in range(n_new):
    step = logits[:, len(prompt) - 1 + g] / temperature
    p = np.exp(step - step.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1)
    sorted_p = np.take_along_axis(p, order, -1)
    keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, -1)
    p = np.where(keep, p, 0.0)
    p /= p.sum(-1, keepdims=True)
    probs *= p[np.arange(len(seqs)), seqs[:, g]]
  return probs


def wrong_rule(rng, p, drafts, q, n_drafts, also_ok=None, right_rule=decoding.speculative_accept):
  """The speculative-sampling rule with a classic bug: after a rejection, the next token is
  drawn from p instead of the normalised max(0, p - q)."""
  n_accept, _ = right_rule(rng, p, drafts, q, n_drafts, also_ok)
  return n_accept, jnp.take_along_axis(p, n_accept[:, None, None], axis=1)[:, 0]


def test_sampled_verify_has_the_distribution_of_ar_sampling(monkeypatch):
  """At temperature 0.8 and top-p 0.85 the first four tokens of `verify` (W = 3: two drafts a
  pass, so the tokens after the first are drafts verified by the rule, or corrections) are
  distributed as under AR sampling of the clean stream, computed exactly by enumeration for a
  vocabulary of 3 tokens (81 continuations). The frequency test: N = 10,000 rows (independent
  draws), the chi-square statistic over the cells inside the nucleus against df + 6 sqrt(2 df)
  (df = cells - 1; a p-value near 1e-8); the same test fails on the rule with the bug above
  (its statistic was about 2,500 when this was written)."""
  model = small_model(vocab_size=3)
  params = jax.jit(lambda k: jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(9), p.shape),
      state_lib.init_params(model, k)))(jax.random.key(2))
  prompt, n_new, N, temperature, top_p = [1, 0, 2, 2, 1], 4, 10_000, 0.8, 0.85
  expected = N * ar_sampling_probs(model, params, prompt, n_new, temperature, top_p)

  def chi_square():
    buf = np.zeros((N, 16), np.int32)
    buf[:, :len(prompt)] = prompt
    lens = np.full((N,), len(prompt), np.int32)
    out = jax.device_get(decoding.decode_batch(
        model, params, SCHED, buf, lens, lens + n_new, jax.random.key(0),
        policy=decoding.make_policy("verify", window=3, steps=2), max_new_tokens=n_new,
        temperature=temperature, top_p=top_p))
    assert np.sum(out["accepted"]) > N // 2          # drafts were accepted (and rejected)
    new = out["tokens"][:, len(prompt):len(prompt) + n_new]
    counts = np.bincount(np.ravel_multi_index(new.T, (3,) * n_new), minlength=3 ** n_new)
    assert np.all(counts[expected == 0] == 0)        # nothing outside the nucleus
    seen = expected > 0
    return np.sum((counts[seen] - expected[seen]) ** 2 / expected[seen])

  df = np.sum(expected > 0) - 1
  threshold = df + 6 * np.sqrt(2 * df)
  assert chi_square() < threshold
  monkeypatch.setattr(decoding, "speculative_accept", wrong_rule)
  jax.clear_caches()                                 # retrace the loop with the wrong rule
  try:
    assert chi_square() > threshold
  finally:
    monkeypatch.undo()
    jax.clear_caches()
