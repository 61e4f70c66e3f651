"""A dask.distributed client for slide segmentation: a LocalCluster of worker processes, or an existing cluster."""
from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["SINGLE_THREAD_ENV", "keep_allocator", "slide_client"]

#: Each worker is one process with one thread: its BLAS and OpenMP pools get one thread too,
#: so N workers use N cores (and do not fight over them).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "OPENCV_FOR_THREADS_NUM": "1"}


#: What dask's nanny puts in a worker's environment before it starts (``distributed.nanny.pre-spawn-environ``)
#: and the slide workers must not get.
ALLOCATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_",)


@contextlib.contextmanager
def keep_allocator():
    """Start workers with the allocator of a plain Python process (the one the engines are measured in).

    dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in the environment a worker is spawned
    with, so that idle workers give memory back. Setting that variable at all also turns off
    glibc's *dynamic* mmap threshold: every buffer above 128 KiB is then mapped and unmapped
    again on each use, and an inference engine that frees its layer buffers between forwards
    (OpenCV's DNN, ONNX Runtime's arena aside) faults them in on every tile -- about 1.4× the
    time of a forward, most of it in the kernel. Slide workers hold one net and its buffers
    for their whole life, so they start without the variable (glibc's defaults, as in the
    in-process run). A value the user exported is kept: glibc reads it before Python starts,
    and the worker inherits it like any process.
    """
    import dask

    pre_spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    ours = {key: value for key, value in pre_spawn.items() if key not in ALLOCATOR_VARIABLES or key in os.environ}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": ours}):
        yield


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
    with keep_allocator():  # the nanny reads its pre-spawn environment when it is created
        cluster = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR, env=SINGLE_THREAD_ENV)
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()
