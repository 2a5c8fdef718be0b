#!/bin/sh
# The demo, on a Debian 12 machine as root: set-up, then the lab demo.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup.sh
export PATH="$PATH:/usr/sbin:/sbin"
exec .venv/bin/python -m slaposha.demo "$@"
