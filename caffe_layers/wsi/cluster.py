"""A dask.distributed client for slide segmentation: a LocalCluster of worker processes, or an existing cluster."""
from __future__ import annotations

import contextlib
import logging

__all__ = ["SINGLE_THREAD_ENV", "slide_client"]

#: Each worker is one process with one thread: its BLAS and OpenMP pools get one thread too,
#: so N workers use N cores (and do not fight over them).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "OPENCV_FOR_THREADS_NUM": "1"}


def _import_distributed():
    try:
        import distributed
    except ImportError as error:
        raise ValueError("--workers and --scheduler need dask.distributed "
                         f"(pip install 'caffe-stain-augment[slides]'): {error}") from None
    return distributed


@contextlib.contextmanager
def slide_client(workers=None, scheduler=None):
    """Yield a ``distributed.Client``: on ``scheduler`` (an address) or on a new LocalCluster of ``workers`` processes.

    The cluster started here is closed on exit (also on Ctrl-C); an existing one is left running.
    """
    distributed = _import_distributed()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as error:
            raise ValueError(f"--scheduler {scheduler}: cannot connect ({error})") from None
        with client:
            yield client
        return
    cluster = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR, env=SINGLE_THREAD_ENV)
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()
