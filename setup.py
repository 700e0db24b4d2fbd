from setuptools import find_packages, setup

setup(
    name="evo_jax",
    version="0.1.0",
    description="Evo language models (autoregressive-diffusion with evolving balance) in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["evo_jax", "evo_jax.*"]),
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
        "test": ["pytest>=8", "matplotlib>=3.7"],
        # TPU VMs (launch/tpu_pod.sh); on any machine, libtpu also lets `python -m evo_jax.aot`
        # compile for TPU topologies it does not have.
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # GPU nodes (launch/slurm.sbatch).
        "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    },
)
