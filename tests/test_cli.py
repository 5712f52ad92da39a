from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dask_zarr_cache.cli import format_stats, main


def test_demo_reads_once_and_is_correct(capsys):
    argv = ["demo", "--workers", "2", "--passes", "2", "--side", "256", "--chunk", "64"]
    assert main([*argv, "--latency-ms", "5"]) == 0
    out = capsys.readouterr().out
    rows = {  # label | wall s, S3 GETs, peer reads, local hits, ok
        line[:18].strip(): line[18:].split()
        for line in out.splitlines()
        if line.startswith(("no cache", "cache,"))
    }
    assert list(rows) == ["no cache", "cache, cold", "cache, warm 1"]
    assert rows["no cache"][1] == "16"  # S3 GETs, counted at the server
    assert rows["cache, cold"][1] == "16"
    assert rows["cache, warm 1"][1] == "0"
    assert int(rows["cache, warm 1"][2]) + int(rows["cache, warm 1"][3]) == 16
    assert all(r[-1] == "yes" for r in rows.values())
    assert "dashboard http://127.0.0.1:" in out


#: What a clean exit never prints: a nanny that had to kill its worker says "WARNING -
#: Worker process still alive"; a handler that failed while the cluster closed "ERROR -
#: Exception while handling op"; a cancelled gather "exception was never retrieved".
ALARMING = ("WARNING", "ERROR", "Traceback", "never retrieved", "Unclosed client session")


def test_demo_exits_cleanly_without_an_alarming_line():
    # As a new user runs it, with its defaults (3 workers: closing them moves the
    # index shards): a process of its own, everything it prints read.
    done = subprocess.run(
        [sys.executable, "-m", "dask_zarr_cache.cli", "demo", "--passes", "2"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache, cold" in done.stdout
    output = done.stdout + done.stderr
    alarming = [line for line in output.splitlines() if any(a in line for a in ALARMING)]
    assert alarming == [], done.stderr[-4000:]


def test_stats_prints_a_table_and_json(client, capsys):
    address = client.scheduler.address
    assert main(["stats", "--scheduler", address]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["worker", "hits", "misses"]
    assert table.splitlines()[-1].startswith("total")
    assert main(["stats", "--scheduler", address, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats["workers"]) == set(client.scheduler_info()["workers"])
    assert stats["total"]["hits"] == sum(w["hits"] for w in stats["workers"].values())


def test_format_stats_has_a_total_row():
    text = format_stats({"workers": {"tcp://a": {"hits": 2}}, "total": {"hits": 2}})
    assert text.splitlines()[-1].split()[:2] == ["total", "2"]


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["nope"])
