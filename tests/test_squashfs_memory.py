"""Issue 13: a pull's memory does not grow with the number of files in the image.

The merge keeps its files in an on-disk index (tests/test_layers.py checks the merge alone); the
native squashfs writer keeps what it learns per file there too. (mksquashfs, the reference, keeps
~0.7 KB a file until the end: bench/pull.py shows both.)"""

from __future__ import annotations

import subprocess
import sys

from tests import imagetools as it
from tests.needs import need_tools

_PEAK_OF_A_BUILD = r"""
import sys
from shpc_lite.pull import LayerBlob, build_squashfs

build_squashfs([LayerBlob(sys.argv[1], "application/vnd.oci.image.layer.v1.tar+gzip", "sha256:x")],
               {"config": {}}, sys.argv[2], source_ref="r", source_digest="d", workdir=sys.argv[3],
               method="native", processors=2)
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def _inodes(sqfs) -> int:
    out = subprocess.run(["unsquashfs", "-s", str(sqfs)], capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[-1] for line in out.splitlines() if line.startswith("Number of inodes")))


def test_a_native_build_peaks_the_same_for_2000_and_80000_files(tmp_path):
    """Merge + native writer of a layer of 80,000 files peaks within a few MB of one of 2,000 (one
    object per file would be +23 MB; mksquashfs's tables +50 MB), and every file is in the image."""
    need_tools("unsquashfs")
    peaks = {}
    for files in (2_000, 80_000):
        layer = tmp_path / f"{files}.tar.gz"
        it.many_files_layer(layer, files)
        dest = tmp_path / f"{files}.sqfs"
        out = subprocess.run([sys.executable, "-c", _PEAK_OF_A_BUILD, str(layer), str(dest), str(tmp_path / "w")],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        peaks[files] = int(out.split()[-1]) / 1024
        assert _inodes(dest) > files + files // 200  # the files and their directories (and Apptainer's)
    assert peaks[80_000] - peaks[2_000] < 6, peaks
