"""The tiny config: a 4-layer width-128 Evo trained on the Python standard library on a laptop
CPU in a few minutes. Every field and its meaning: evo_jax/config.py."""
from evo_jax import config


def get_config():
  return config.default_config()
