"""One worker process of tests/test_shard_workers.py: runs ``hwsi`` (hwsi.cli.main) with this script's arguments.

With ``HWSI_TEST_KILL_AT=<slide_id>`` the worker dies (SIGKILL) in the middle of that slide: after the batch runner
claimed it and after a temporary store was begun, exactly what a node crash or an OOM kill leaves behind. With
``HWSI_TEST_STOP_AT=<slide_id>`` it stops itself (SIGSTOP) there instead: a hung worker whose process is still
alive (its claim goes stale only by the timeout); sent SIGCONT it carries on and tiles the slide for real.
With ``HWSI_TEST_SLOW_FINISH_RANK=<rank>`` the torchrun rank of that number takes 3 s longer to write
``slides.json`` at its end (a slow shared file system), so a rank that ended first and exited would have torchrun
stop it in the middle. Everything around those moments — claims, stealing, the manifest, tile_slide itself — is the
real code.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import hwsi.slide.tile as tile
from hwsi.cli import main
from hwsi.store import store_path
from hwsi.utils.atomic import tmp_path_for

_real_tile_slide = tile.tile_slide


def _tile_slide_then_fail(spec, job, cfg=None, annotations=None):  # type: ignore[no-untyped-def]
    kill_at, stop_at = os.environ.get("HWSI_TEST_KILL_AT"), os.environ.get("HWSI_TEST_STOP_AT")
    if spec.slide_id in (kill_at, stop_at):
        if spec.slide_id == kill_at:  # the temporary a writer killed mid-store leaves
            tmp_path_for(store_path(job, spec.slide_id)).write_bytes(b"half a store")
        sys.stderr.write(f"worker {os.getpid()}: {'killed' if spec.slide_id == kill_at else 'stopped'} in "
                         f"{spec.slide_id}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL if spec.slide_id == kill_at else signal.SIGSTOP)
    return _real_tile_slide(spec, job, cfg, annotations)


_real_update_registry = tile.update_registry


def _slow_update_registry(*args, **kwargs):  # type: ignore[no-untyped-def]
    time.sleep(3.0)
    return _real_update_registry(*args, **kwargs)


if __name__ == "__main__":
    tile.tile_slide = _tile_slide_then_fail
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("HWSI_TEST_SLOW_FINISH_RANK"):
        tile.update_registry = _slow_update_registry
    sys.exit(main(sys.argv[1:]))
