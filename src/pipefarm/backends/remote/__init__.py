"""Worker slots on an engine's workers, reached over TCP: the engine-neutral part of the dask and
ray backends (:mod:`.transport` on the coordinator, :mod:`.slot` on the engine's side)."""
