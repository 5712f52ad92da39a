"""The frequency sketch behind TinyLFU admission."""

from __future__ import annotations

from dask_zarr_cache.index.admission import FrequencySketch


def test_counts_accesses_and_saturates_at_fifteen():
    sketch = FrequencySketch()
    assert sketch.frequency("a") == 0
    for _ in range(3):
        sketch.increment("a")
    assert sketch.frequency("a") == 3
    for _ in range(40):
        sketch.increment("b")
    assert sketch.frequency("b") == 15
    assert sketch.frequency("a") == 3


def test_estimates_never_undercount_many_keys():
    sketch = FrequencySketch(1 << 14)
    truth = {f"k{i}": i % 7 + 1 for i in range(2000)}
    for key, n in truth.items():
        for _ in range(n):
            sketch.increment(key)
    estimates = {key: sketch.frequency(key) for key in truth}
    assert all(estimates[k] >= n for k, n in truth.items())
    exact = sum(estimates[k] == n for k, n in truth.items())
    assert exact / len(truth) > 0.95  # 2,000 keys in 16,384 counters: collisions are rare


def test_counts_are_halved_every_ten_times_width_accesses():
    sketch = FrequencySketch(1 << 12)
    for _ in range(8):
        sketch.increment("old")
    for i in range(10 * sketch.width - 8):
        sketch.increment(f"noise{i % 3}")
    assert sketch.frequency("old") == 4  # what was hot long ago fades


def test_fit_grows_the_table_with_the_cache():
    sketch = FrequencySketch()
    width = sketch.width
    sketch.fit(width // 2)
    assert sketch.width == width
    sketch.fit(width)
    assert sketch.width >= 2 * width
