"""uld_jax.mine: mining missing annotations (MAM) and suspicious regions (NRM) for finetuning.

Modules:
  mam      per-patient embedding distances (bucketed, jitted, sharded) -> mined positives
  nrm      confident single-type expert proposals not explained by any positive -> ignore regions
  overlap  same-slice box overlap (the one overlap rule of mining) on the host
  table    the mined-annotation overlay .npz: canonical rows, provenance, atomic write, validation
  run      the end-to-end core: slice table + annotations + proposals -> overlay
  store    resumable per-chunk storage of a mining run's model outputs
  quality  mining quality against the synthetic world's truth; theta / sigma sweeps
"""
