"""benchmarks/load.py runs end to end on a tiny budget: both runs answer every request."""

from __future__ import annotations

import pytest

from helpers import load_benchmark

pytestmark = pytest.mark.service


def test_load_benchmark_smoke(model_dirs, capsys):
    import logging

    service_log = logging.getLogger("obclip.service")
    level = service_log.level  # the CLI quiets it process-wide; other tests read its records
    load = load_benchmark("load")
    try:
        rc = load.main(["--clients", "2", "--requests", "8", "--n", "2", "--steps", "4", "-k", "2",
                        "--model", str(model_dirs[0])])
    finally:
        service_log.setLevel(level)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batched/unbatched throughput:" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("off (0 ms)", "on ("))]
    assert len(rows) == 2 and all(line.split()[7] == "0" for line in rows), out  # errors column
