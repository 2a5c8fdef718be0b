#!/bin/sh
# Set-up shared by tools/demo.sh and tools/test.sh, for a Debian 12 machine
# as root: the Debian packages the lab and the agent use, then a
# project-local virtualenv (.venv) with slaposha and its test tools.
# Idempotent and quick when nothing changed.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "$0: run as root: the lab creates network namespaces, bridges and loop devices" >&2
    exit 1
fi

# command:package pairs; a package is installed only when its command is missing.
missing=""
for pair in ip:iproute2 ping:iputils-ping nsenter:util-linux losetup:mount \
            etcd:etcd-server etcdctl:etcd-client mkfs.btrfs:btrfs-progs \
            rsync:rsync supervisord:supervisor openssl:openssl \
            chromium:chromium; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing="$missing $pkg"
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$missing python3-venv"
# The lab's SlapOS node install is a virtualenv of the machine's own python3.
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
    || missing="$missing python3 python3-venv"
# slapos.core needs netifaces, which PyPI has only as source: a C compiler
# and the Python headers build it.
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
# (for the project's python3 and for the node install's /usr/bin/python3)
for py in python3 /usr/bin/python3; do
    $py -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
        2>/dev/null || { missing="$missing python3-dev"; break; }
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

# etcd 3.5.13 or newer for the lab, the demo and the benchmarks: it has the
# lease-safety fixes that Debian 12's 3.4.23 lacks (DESIGN.md 1). Debian
# 13's etcd-server (3.5.16, a static Go binary that runs here) is fetched
# with a source list and an apt state of its own, in a temporary folder,
# and unpacked into .lab/etcd: nothing of the system's changes, not even
# its package lists. /usr/bin/etcd (3.4) stays for the test that keeps it
# working.
etcd=.lab/etcd/usr/bin/etcd
if ! "$etcd" --version 2>/dev/null | grep -Eq '^etcd Version: 3\.(5\.(1[3-9]|[2-9][0-9])|[6-9]\.)'; then
    echo "setup: etcd 3.5 from Debian 13 into .lab/etcd"
    apt_dir=$(mktemp -d)
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" \
        "$apt_dir/parts" "$apt_dir/preferences"
    echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' \
        > "$apt_dir/sources.list"
    set -- -q -o Dir::Etc::SourceList="$apt_dir/sources.list" \
        -o Dir::Etc::SourceParts="$apt_dir/parts" \
        -o Dir::Etc::PreferencesParts="$apt_dir/preferences" \
        -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
        -o APT::Sandbox::User=root
    apt-get "$@" update >/dev/null
    (cd "$apt_dir" && apt-get "$@" download etcd-server >/dev/null)
    rm -rf .lab/etcd
    mkdir -p .lab
    dpkg-deb -x "$apt_dir"/etcd-server_*.deb .lab/etcd
    rm -rf "$apt_dir"
    trap - EXIT
    "$etcd" --version | head -1
fi

# The virtualenv is rebuilt only when setup.py changed.
stamp=.venv/.slaposha-setup
want=$(cat setup.py tools/setup.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
    echo "setup: creating .venv with slaposha and its test tools"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" > $stamp
fi

# The SlapOS node install of the lab (slapos.core in a virtualenv of
# /usr/bin/python3, shared at /opt/slapos by the lab's hosts; built once).
echo "setup: the lab's SlapOS node install (.lab/slapos-node)"
.venv/bin/python -c 'from slaposha.lab.slapos import node_install; node_install()'
