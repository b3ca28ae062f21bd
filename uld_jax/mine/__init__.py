"""uld_jax.mine: mining missing annotations (MAM) and suspicious regions (NRM) for finetuning.

Modules:
  mam      per-patient embedding distances (bucketed, jitted, sharded) -> mined positives
  nrm      confident single-type expert proposals not explained by any positive -> ignore regions
  overlap  same-slice box overlap (the one overlap rule of mining) on the host
  table    the overlay .npz format (mining and the pipeline): canonical rows, provenance, atomic
           write, validation
  run      the end-to-end core: slice table + annotations + proposals -> overlay
  store    resumable per-chunk storage of a mining run's model outputs
  quality  mining quality against the synthetic world's truth; theta / sigma sweeps
  driver   ``python -m uld_jax.mine``: checkpoint -> inference over training slices every 5 mm
           (resumable chunks, sharded) -> MAM + NRM -> overlay in the workdir
  report   ``python -m uld_jax.mine.report``: quality report + sweeps as Markdown / JSON
  external ``python -m uld_jax.mine.external``: a run's lesions and proposals (with crops) for an
           external embedding (e.g. LesaNet's), read back by ``python -m uld_jax.mine --embeddings``
"""
