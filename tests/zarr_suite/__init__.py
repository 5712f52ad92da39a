"""Run zarr-python's own test suite through ``ClusterCacheStore`` (see ``run.py``)."""
