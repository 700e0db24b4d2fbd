import jax
import jax.numpy as jnp
import numpy as np

from evo_jax import attention
from evo_jax import progression


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
