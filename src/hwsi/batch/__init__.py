"""The per-slide batch runner shared by `hwsi tile` and `hwsi extract`: skip finished slides, record failures, shard
a job over several workers with claims and work stealing, and keep the job manifest (docs/cluster.md).

:mod:`~hwsi.batch.runner` runs a batch, :mod:`~hwsi.batch.claims` owns the claim files (``JOB/.claims/``),
:mod:`~hwsi.batch.manifest` owns ``JOB/manifest.csv``, ``JOB/summary.md`` and their per-worker parts.
"""

from hwsi.batch.claims import DEFAULT_CLAIM_TIMEOUT_S
from hwsi.batch.runner import (
    JOB_SUBDIRS,
    BatchItem,
    BatchResult,
    SlideOutcome,
    error_record_path,
    lock_path,
    prepare_job,
    print_summary,
    run_batch,
    shard_indices,
)

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT_S",
    "JOB_SUBDIRS",
    "BatchItem",
    "BatchResult",
    "SlideOutcome",
    "error_record_path",
    "lock_path",
    "prepare_job",
    "print_summary",
    "run_batch",
    "shard_indices",
]
