"""prvr_jax: partially relevant video retrieval (MSC, NeurIPS 2025) in JAX/Flax."""

__version__ = "0.1.0"
