"""uld_jax.mine."""
