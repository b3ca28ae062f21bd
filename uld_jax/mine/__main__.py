"""``python -m uld_jax.mine --workdir DIR [...]``: see :mod:`uld_jax.mine.driver`."""

from uld_jax.mine.driver import main

raise SystemExit(main())
