"""uld_jax.models."""
