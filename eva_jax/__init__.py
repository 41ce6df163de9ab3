"""eva_jax: Evolving Alignment via Asymmetric Self-Play (arXiv 2411.00062) in JAX."""

__version__ = "0.1.0"
