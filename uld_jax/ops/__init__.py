"""uld_jax.ops."""
