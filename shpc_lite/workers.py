"""One batch split over forked worker processes, so that a large install uses every core.

Generating modules is CPU work (recipes, templates) and thousands of file creations, and one
Python process does all of it on one core (the GIL). ``map_forked`` runs a function over shards
of the work: the first shard here, each other one in a child made by ``fork``, which starts with
everything this process has loaded (config, recipes, templates) at no cost. A child sends its
result back pickled over a pipe and leaves with ``os._exit`` (the parent's exit handlers are
the parent's).

Crash safety is the single process's, per worker: each writes its modules by the batch protocol
of ``shpc_lite.publish``, and work is sharded by module name, so no two workers write the same
name's files or defaults. A child dies with its parent (``PR_SET_PDEATHSIG``, SIGKILL): after a
``kill -9`` of the CLI no worker goes on writing, as no thread of a single process would. Ctrl-C
reaches every process of the group, and a SIGTERM of the parent alone is passed on; each worker
then removes what it staged, as one process does.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import Callable, TypeVar

S = TypeVar("S")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a Slurm job's allocation, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def map_forked(fn: Callable[[S], R], shards: list[S], lost: Callable[[S, str], R]) -> list[R]:
    """``fn`` over every shard, concurrently; the results in shard order. ``fn`` reports its
    failures in its result. A child that dies without a result (killed, out of memory) or with
    an error gives ``lost(shard, reason)`` instead. An interrupt (Ctrl-C, SIGTERM) here is
    passed to the children, waited for (they clean up), and raised."""
    if len(shards) <= 1 or not hasattr(os, "fork"):
        return [fn(shard) for shard in shards]
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    children: list[tuple[int, int]] = []
    try:
        for shard in shards[1:]:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                os.close(read)
                _child(fn, shard, write, parent)
            os.close(write)
            children.append((pid, read))
        results = [fn(shards[0])]
        for shard in shards[1:]:
            pid, read = children.pop(0)
            results.append(_collect(pid, read, shard, lost))
        return results
    finally:
        for pid, read in children:  # only on an exception: stop the workers, let them clean up
            os.close(read)
            _stop(pid)


def _child(fn: Callable[[S], R], shard: S, write: int, parent: int) -> None:
    code = 0
    try:
        _die_with_parent(parent)
        reply = ("done", fn(shard))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: fn's clean-up ran while unwinding
        reply, code = ("interrupted", None), 130
    except BaseException as err:  # noqa: BLE001 - reported to the parent in one line
        reply, code = ("error", f"{type(err).__name__}: {err}"), 1
    try:
        data = pickle.dumps(reply)
    except Exception as err:  # noqa: BLE001
        data, code = pickle.dumps(("error", f"result not returned: {err}")), 1
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write, view):]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); leave at once if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _collect(pid: int, read: int, shard: S, lost: Callable[[S, str], R]) -> R:
    chunks = []
    try:
        with os.fdopen(read, "rb") as pipe:
            while True:
                chunk = pipe.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:
        _stop(pid)
        raise
    _, status = os.waitpid(pid, 0)
    try:
        kind, value = pickle.loads(b"".join(chunks))
    except Exception:  # noqa: BLE001 - nothing (or a torn result) came back
        if os.WIFSIGNALED(status):
            return lost(shard, f"worker process {pid} was killed by signal {os.WTERMSIG(status)}")
        return lost(shard, f"worker process {pid} exited with status {os.waitstatus_to_exitcode(status)}")
    if kind == "interrupted":
        raise KeyboardInterrupt
    if kind == "error":
        return lost(shard, f"worker process {pid}: {value}")
    return value


def _stop(pid: int) -> None:
    """SIGTERM a child (its clean-up runs as on Ctrl-C) and wait for it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
