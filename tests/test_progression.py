import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evo_jax import attention
from evo_jax import progression
from evo_jax.errors import ConfigError


def draw(cfg, B=256, L=32, step=0, seed=0):
  sample = jax.jit(lambda rng, step: progression.sample(rng, cfg.progression, B, L, step))
  t, W, o = sample(jax.random.key(seed), step)
  return np.asarray(t), np.asarray(W), np.asarray(o)


def test_windows_include_ar_and_diffusion(small_cfg):
  small_cfg.progression.p_t_one = 0.1
  t, W, o = draw(small_cfg)
  assert set(W.tolist()) == {1, 4, 16, 32}
  assert np.all((0 <= o) & (o < W))
  assert np.all((0 <= t) & (t <= 1))
  p_one = np.mean(t == 1.0)
  assert 0.05 < p_one < 0.2, p_one   # p_t_one = 0.1, plus nothing else lands exactly on 1


def test_patterns(small_cfg):
  p = small_cfg.progression
  L = 32
  for name in progression.PATTERNS:
    p.pattern_probs.update({k: float(k == name) for k in progression.PATTERNS})
    p.p_t_one = 0.0
    t, W, o = draw(small_cfg, L=L)
    w = np.asarray(attention.window_ids(jnp.asarray(W), jnp.asarray(o), L))
    for b in range(len(W)):
      if W[b] < 2:
        continue
      for win in np.unique(w[b]):
        tw = t[b][w[b] == win]
        if name == "shared":
          assert np.all(tw == tw[0])
        elif name == "ramp" and len(tw) > 1:
          assert np.all(np.diff(tw) > 0)
      if name == "independent":
        assert len(np.unique(t[b])) == L


def test_stratified_times_cover_the_unit_interval(small_cfg):
  u = np.asarray(progression.stratified_uniforms(jax.random.key(0), 64, 8, True))
  for col in u.T:   # one point in each of the 64 strata
    np.testing.assert_array_equal(np.sort(np.floor(col * 64)), np.arange(64))


def test_curriculum_moves_from_start_to_end(small_cfg):
  p = small_cfg.progression
  p.window_probs_start = (1.0, 0.0, 0.0, 0.0)
  p.curriculum_steps = 100
  _, W0, _ = draw(small_cfg, step=0)
  assert np.all(W0 == 1)
  np.testing.assert_allclose(progression.window_probs(p, 100), np.asarray(p.window_probs))
  np.testing.assert_allclose(progression.window_probs(p, 50), [0.7, 0.1, 0.1, 0.1], rtol=1e-6)


def test_the_adaptive_t_distribution_follows_the_rise_of_the_loss(small_cfg):
  """t_base = adaptive: the bins' probabilities sum to 1, are uniform for a fresh run, put the
  most mass where the running cross-entropy rises, and never less than the uniform floor;
  base_times maps stratified uniforms onto that density, and base_density integrates to 1."""
  p = small_cfg.progression
  p.update(t_base="adaptive", adaptive_bins=10, adaptive_floor=0.2)
  progression.check_config(p)
  fresh = progression.adaptive_density(p, jnp.zeros(10))
  np.testing.assert_allclose(fresh, 0.1, rtol=1e-6)
  ce = jnp.asarray([0.0, 0.0, 0.1, 0.2, 3.0, 5.0, 5.5, 5.6, 5.6, 5.5])   # rises at bins 4-5
  density = progression.adaptive_density(p, ce)
  np.testing.assert_allclose(float(jnp.sum(density)), 1.0, rtol=1e-6)
  assert set(np.argsort(-np.asarray(density))[:2]) == {4, 5}
  assert float(jnp.min(density)) >= 0.2 / 10 - 1e-7
  u = (jnp.arange(100_000) + 0.5) / 100_000
  t = np.asarray(progression.base_times(p, u, density))
  assert np.all(np.diff(t) >= 0) and 0 <= t.min() and t.max() < 1
  np.testing.assert_allclose(np.histogram(t, bins=10, range=(0, 1))[0] / len(t), density,
                             atol=1e-4)
  grid = (jnp.arange(10_000) + 0.5) / 10_000
  np.testing.assert_allclose(float(jnp.mean(progression.base_density(p, grid, density))), 1.0,
                             rtol=1e-5)
  # The running means: a bin's first value is its first mean, then an EMA; unseen bins stay.
  first = progression.update_bin_ce(p, jnp.zeros(10), jnp.full(10, 2.0),
                                    jnp.asarray([1] * 9 + [0]))
  np.testing.assert_allclose(first, [2.0] * 9 + [0.0])
  again = progression.update_bin_ce(p, first, jnp.full(10, 4.0), jnp.full(10, 1))
  np.testing.assert_allclose(again[0], 0.99 * 2.0 + 0.01 * 4.0, rtol=1e-6)


def test_adaptive_config_errors_are_one_line(small_cfg):
  p = small_cfg.progression
  p.t_base = "adaptive"
  for field, value, fragment in [("adaptive_floor", 0.0, "mass at every t"),
                                 ("adaptive_bins", 1, "adaptive_bins must be >= 2"),
                                 ("adaptive_decay", 1.0, "adaptive_decay must be in [0, 1)")]:
    cfg = p.copy_and_resolve_references()
    cfg[field] = value
    with pytest.raises(ConfigError) as e:
      progression.check_config(cfg)
    assert fragment in str(e.value) and "\n" not in str(e.value)
