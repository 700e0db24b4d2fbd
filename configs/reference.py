"""The reference run: the tiny model trained for 2,000 steps on the Python standard library, the
run on which the method's numbers in the README and docs/ are measured (about 30 minutes on a
2-core CPU). Its levers and their measurements: docs/training.md, "The reference run"."""
from evo_jax import config


def get_config():
  c = config.default_config()
  c.train.update(steps=2000, eval_every=250, ckpt_every=500)
  return c
