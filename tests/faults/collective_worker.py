"""One rank of the collective-timeout tests: ``python collective_worker.py RANK WORLD PORT DIR``.

Every rank joins a gloo group (the timeout comes from $DETRFORGE_COLLECTIVE_TIMEOUT_S through
``pipeline.dist``), takes part in one all-reduce and writes ``DIR/ready<rank>``. Rank 0 then waits
for ``DIR/go`` (the test writes it once it has killed or stopped the other rank) and enters a
second all-reduce, which must fail; the other ranks sleep until they are killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline import dist


def main() -> int:
    rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    dist.init_distributed(dist.DistEnv(rank=rank, world_size=world, master_port=port),
                          backend="gloo")
    assert dist.all_reduce_sum(1.0) == world
    (folder / f"ready{rank}").write_text("")
    if rank != 0:
        time.sleep(3600)
        return 0
    while not (folder / "go").exists():
        time.sleep(0.05)
    dist.all_reduce_sum(1.0)  # the peer is gone or frozen: this must raise, not wait for ever
    return 0


if __name__ == "__main__":
    sys.exit(main())
