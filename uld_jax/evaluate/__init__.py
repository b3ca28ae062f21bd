"""uld_jax.evaluate."""
