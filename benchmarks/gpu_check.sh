#!/usr/bin/env bash
# The GPU check in one command: the CUDA tier of the tests and the main benchmarks, at most 8 minutes, a report in
# $OUT/gpu_check.md (or gpu_check_report.md). Needs torch with CUDA, lightning and torchmetrics; nothing is installed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
