#!/bin/sh
# Recording stand-in for `singularity`/`apptainer` (neither is packaged for Debian 12): it
# writes its argv (NUL-separated) and its environment (env -0) where the test says, so tests
# check exactly what a wrapper would have executed. Everything up to this exec is real.
# Under mpirun (MPICH sets PMI_RANK) each rank records to its own file: <record>.<rank>.
record="${SHPC_LITE_TEST_RECORD:?}${PMI_RANK:+.$PMI_RANK}"
printf '%s\0' "$@" > "$record.argv"
env -0 > "$record.env"
