"""Makes the bare `lm_eval --model evo_jax ...` command find this package's model.

lm-eval 0.4.13 has no plugin discovery: its model registry is filled by `lm_eval.models`, from a
list written into that module. So setup.py installs `evo_jax_lm_eval.pth` into site-packages, and
Python runs its one line at start-up: `install()` below, which costs a string comparison per
import and imports nothing. When `lm_eval.models` is first imported (lm-eval does so to fill its
registry), `evo_jax` is added to the registry as a lazy "module:attr" entry, so neither jax nor
the model is loaded unless `--model evo_jax` is asked for.
"""
import sys

MODEL_NAME = "evo_jax"
TARGET = "evo_jax.harness:EvoLM"


def register():
  """Adds the lazy `evo_jax` entry to lm-eval's model registry (once; never raises)."""
  try:
    from lm_eval.api.registry import model_registry
    if MODEL_NAME not in model_registry:
      model_registry.register(MODEL_NAME, target=TARGET)
  except (ImportError, AttributeError, TypeError, ValueError):
    pass    # another lm-eval layout: `python -m evo_jax.harness` still works


class _RegisterWhenLmEvalModelsLoads:
  """A meta-path finder that finds nothing: it only notices the import of lm_eval.models."""

  def find_spec(self, name, path=None, target=None):
    if name == "lm_eval.models":
      register()
    return None     # the normal finders load the module


def install():
  if "lm_eval.models" in sys.modules:
    register()
  elif not any(isinstance(f, _RegisterWhenLmEvalModelsLoads) for f in sys.meta_path):
    # First, so it runs before the path finder loads the module.
    sys.meta_path.insert(0, _RegisterWhenLmEvalModelsLoads())
