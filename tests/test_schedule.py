import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evo_jax import schedule
from evo_jax.errors import ConfigError


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_log_snr_inverse_and_endpoints(kind, shift):
  s = schedule.Schedule(kind, shift)
  t = jnp.linspace(0.01, 0.99, 50)
  np.testing.assert_allclose(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-4, atol=1e-5)
  a, sig = s.alpha_sigma(jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(a, [1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(sig, [0.0, 1.0], atol=1e-6)
  lam = s.log_snr(t)
  assert np.all(np.diff(lam) < 0), "log-SNR must fall as t rises"
  a, sig = s.alpha_sigma(t)
  np.testing.assert_allclose(lam, 2 * np.log(a / sig), rtol=1e-4, atol=1e-4)


def test_shift_moves_time_toward_noise():
  base, shifted = schedule.Schedule("linear", 1.0), schedule.Schedule("linear", 4.0)
  t = jnp.linspace(0.05, 0.95, 10)
  assert np.all(shifted.log_snr(t) < base.log_snr(t))


def test_linear_elbo_weight_matches_closed_form():
  """-1/2 SNR'(t) = (1 - t) / t^3 for the linear schedule (method.md section 7)."""
  s = schedule.Schedule("linear", 1.0)      # unshifted: the closed form is for shift 1
  t = jnp.linspace(0.1, 0.9, 9)
  lam, dlam = jax.jvp(s.log_snr, (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(0.5 * jnp.exp(lam) * jnp.abs(dlam), (1 - t) / t ** 3, rtol=1e-4)


def test_bad_schedule_is_a_config_error():
  with pytest.raises(ConfigError, match="schedule.kind"):
    schedule.Schedule("quadratic", 1.0)
