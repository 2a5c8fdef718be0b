#!/bin/sh
# The whole test suite, on a Debian 12 machine as root: set-up, then pytest.
# Arguments go to pytest (e.g. tools/test.sh -k lab -x).
set -eu
cd "$(dirname "$0")/.."
sh tools/setup.sh
export PATH="$PATH:/usr/sbin:/sbin"
exec .venv/bin/python -m pytest "$@"
