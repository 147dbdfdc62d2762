"""Progress of pulls: a bar per image on a terminal, plain log lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional


# Bars need the terminal to themselves: a batch's worker processes (shpc_lite.workers) log plain
# lines instead, so their pulls never draw over the bars of the process that owns the terminal.
_BARS = True


def plain_lines() -> None:
    """Log progress as plain lines in this process from now on, even on a terminal."""
    global _BARS
    _BARS = False


class Progress:
    """Byte and layer counts of one image; thread-safe (layers download concurrently)."""

    def __init__(self, label: str, total_bytes: int, layers: int, *, quiet: bool = False, stream=None):
        self.label = label
        self.layers = layers
        self.layers_done = 0
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._quiet = quiet
        self._bar = None
        self._last_log = 0.0
        self._done_bytes = 0
        self._total = total_bytes
        if quiet:
            return
        if _BARS and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                             file=self._stream, leave=True, dynamic_ncols=True)
            self._bar.set_postfix_str(f"layers 0/{layers}")
        else:
            self.log(f"pulling {label}: {layers} layers, {total_bytes / 1e6:.1f} MB")

    def log(self, message: str) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(f"shpc-lite: {message}", file=self._stream, flush=True)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done_bytes += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)

    def layer_done(self, digest: str, cached: bool = False) -> None:
        with self._lock:
            self.layers_done += 1
            if self._bar is not None:
                self._bar.set_postfix_str(f"layers {self.layers_done}/{self.layers}")
            elif not self._quiet:
                how = "cached" if cached else "downloaded"
                self.log(f"{self.label}: layer {self.layers_done}/{self.layers} {how} ({digest[:19]})")

    def stage(self, what: str) -> None:
        self.log(f"{self.label}: {what}")

    def close(self, message: Optional[str] = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if message:
            self.log(message)


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f}s"
