"""The owner's side of rsync replication: a tree pushed to its standbys.

For hosts without btrfs, and for copying trees (software releases). The
real rsync binary does the work; slaposha only carries its byte stream over
the same TLS channel as the btrfs streams (:mod:`slaposha.replication.wire`:
cluster CA, host certificates, port 1216) and decides what a copy is worth.
The owner runs ``rsync -aH --delete -e HELPER SRC/ peer:`` where HELPER
relays rsync's stream to the peer's receiver
(:mod:`slaposha.replication.relay`); the peer's
:class:`slaposha.replication.receiver.TreeReceiver` admits it or not and
keeps complete copies only (:mod:`slaposha.replication.tree`).

Consistency is the sender's business (:mod:`slaposha.resources.rsync`):
from a read-only btrfs snapshot when it can, else a live copy, which is not
crash-consistent (reference/replication.md section 1: 28 of 30 live copies
of a database mixed transactions), or only while the applications are
stopped. The mode is recorded with each copy.

One-off copies of a tree to a peer (the lead copies completed software
releases under /opt/slapgrid to the standbys)::

    copy_tree(source, peer, target, tls, host, timeout=600.0) -> Transfer

``source``: a folder here; ``peer``: Peer(name, address, port) of the
peer's receiver; ``target``: the folder to make there, below one of the
receiver's ``copy_roots`` (/opt/slapgrid by default); ``tls``: this host's
(ca, cert, key); ``host``: this host's name (as in its certificate). The
copy lands in a hidden staging folder beside ``target`` (kept after a cut:
the next try resumes from it) and replaces ``target`` only once complete
(an atomic exchange of the two folders). Raises ReplicationError.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

from slaposha.replication import Peer, ReplicationError, StaleToken, trim
from slaposha.replication.relay import ENV, helper_command, rsync_binary
from slaposha.replication.tree import Tree

__all__ = ['push', 'copy_tree', 'Transfer']

# One push or copy: ``acked`` is when the peer confirmed it (wall clock).
Transfer = namedtuple('Transfer', 'peer tree created bytes files seconds'
                      ' acked mode')


def _run_rsync(source, peer, request, tls, timeout, options=(), abort=None,
               on_start=None):
    """rsync ``source`` to ``peer`` with ``request`` as the channel's
    request. Returns (final answer, seconds, stats dict); raises
    ReplicationError (StaleToken when refused for its token)."""
    label = request.get('tree') or request.get('target')
    peer = peer if isinstance(peer, Peer) else Peer(*peer)
    if not os.path.isdir(source):
        raise ReplicationError(label, 'cannot send %s: not a folder'
                               % source, peer.name)
    with tempfile.TemporaryDirectory(prefix='slaposha-rsync-') as folder:
        result = os.path.join(folder, 'answer.json')
        # The helper runs with this process's sys.path: under a buildout
        # script (a software release's bin/slaposha) the interpreter alone
        # would not find slaposha.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in sys.path if p))
        env[ENV] = json.dumps({
            'address': peer.address, 'port': peer.port, 'name': peer.name,
            'tls': list(tls), 'request': request, 'result': result,
            'timeout': timeout})
        # --modify-window=-1: mtimes compared to the nanosecond; rsync's
        # default (whole seconds) skips a file rewritten with the same size
        # within the second of the last copy, and the copy would keep the
        # old content for good.
        command = [rsync_binary(), '-aH', '--numeric-ids', '--delete',
                   '--modify-window=-1', '--stats',
                   '--timeout=%d' % max(1, int(timeout))] + \
            list(options) + ['-e', helper_command(),
                             source.rstrip('/') + '/', '%s:/' % peer.name]
        started = time.monotonic()
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=err, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True,
                                        universal_newlines=True)
            except OSError as e:
                raise ReplicationError(label, 'cannot run rsync: %s' % (
                    e.strerror or e), peer.name)
            if on_start is not None:
                on_start(proc)
            try:
                out, _ = proc.communicate()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            err.seek(0)
            stderr = trim(err.read().decode(errors='replace'))
        seconds = time.monotonic() - started
        try:
            with open(result) as f:
                answer = json.load(f)
        except (OSError, ValueError):
            answer = None
    if abort is not None and abort.is_set():
        raise ReplicationError(label, 'aborted', peer.name)
    if answer is not None and not answer.get('ok'):
        cls = StaleToken if answer.get('stale') else ReplicationError
        raise cls(label, 'refused: %s' % answer.get('error'), peer.name)
    if proc.returncode or answer is None:
        raise ReplicationError(label, 'rsync exit %d: %s' % (
            proc.returncode, stderr or 'no answer from the peer'), peer.name)
    return answer, seconds, _stats(out)


def _stats(out):
    stats = {}
    for line in (out or '').splitlines():
        key, sep, value = line.partition(':')
        if sep:
            digits = value.strip().split(' ')[0].replace(',', '')
            if digits.isdigit():
                stats[key.strip()] = int(digits)
    return stats


def push(tree, peer, tls, host, token, source=None, created=None,
         mode='live', timeout=60.0, abort=None, on_start=None):
    """Copy ``source`` (default: the tree's path) to the tree's store on
    ``peer``, as the owner ``host`` of epoch ``token``. ``created``: when
    the data was taken (wall clock; default now); ``mode``: one of MODES.
    Returns a Transfer; raises ReplicationError (StaleToken when the peer
    has seen a newer epoch: this host is no longer the owner)."""
    tree = tree if isinstance(tree, Tree) else Tree(tree)
    peer = peer if isinstance(peer, Peer) else Peer(*peer)
    created = time.time() if created is None else created
    request = {'op': 'rsync', 'tree': tree.path, 'token': int(token),
               'sender': host, 'created': created, 'mode': mode}
    answer, seconds, stats = _run_rsync(source or tree.path, peer, request,
                                        tls, timeout, abort=abort,
                                        on_start=on_start)
    return Transfer(peer.name, tree.path, created,
                    stats.get('Total bytes sent', answer.get('bytes', 0)),
                    stats.get('Number of regular files transferred'),
                    seconds, time.time(), mode)


def copy_tree(source, peer, target, tls, host, timeout=600.0):
    """Copy the folder ``source`` to ``target`` on ``peer`` (see the module
    docstring). Returns a Transfer; raises ReplicationError."""
    peer = peer if isinstance(peer, Peer) else Peer(*peer)
    request = {'op': 'copy', 'target': os.path.normpath(target),
               'sender': host}
    answer, seconds, stats = _run_rsync(source, peer, request, tls, timeout)
    return Transfer(peer.name, target, None,
                    stats.get('Total bytes sent', answer.get('bytes', 0)),
                    stats.get('Number of regular files transferred'),
                    seconds, time.time(), None)
