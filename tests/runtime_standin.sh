#!/bin/sh
# Recording stand-in for `singularity`/`apptainer` (neither is packaged for Debian 12): it
# writes its argv (NUL-separated) and its environment (env -0) where the test says, so tests
# check exactly what a wrapper would have executed. Everything up to this exec is real.
printf '%s\0' "$@" > "${SHPC_LITE_TEST_RECORD:?}.argv"
env -0 > "$SHPC_LITE_TEST_RECORD.env"
