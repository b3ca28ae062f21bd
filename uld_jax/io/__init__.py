"""uld_jax.io."""
