"""The thread pool every concurrent network step uses (resolve, check, layer downloads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def request_pool(jobs: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A bounded pool, waited for when the work is done.

    On Ctrl-C, SIGTERM or an error it is abandoned instead (queued work cancelled, running work
    not waited for): a request stalled on a slow or endlessly paginating registry, or a stalled
    download, must not keep the process alive; the CLI then exits at once.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, int(jobs)), thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
