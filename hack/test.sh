#!/usr/bin/env bash
# The whole test suite, with its set-up: see .ci/run, which CI calls.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/../.ci/run" "$@"
