"""uld_jax: universal lesion detection in CT from heterogeneously labeled datasets (MELD+MAM+NRM)."""

__version__ = "0.1.0"
