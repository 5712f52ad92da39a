"""Benchmarks of dask-zarr-cache against the alternatives (``python -m benchmarks.run``)."""
