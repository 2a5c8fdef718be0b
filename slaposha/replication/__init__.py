"""Replication: the service's data copied to the standbys, tagged with the
owner's epoch.

A service's data must be on the host that takes it over. The engines differ
in how (reference/replication.md): btrfs snapshots sent one after another
(crash-consistent, cheap increments, an RPO of a few tenths of a second
while written: :mod:`~slaposha.replication.volume`,
:mod:`~slaposha.replication.sender`, paced by
:mod:`~slaposha.replication.pacer`), rsync (:mod:`~slaposha.replication.tree`,
:mod:`~slaposha.replication.push`, :mod:`~slaposha.replication.relay`), or
DRBD where the kernel has it. Every host receives both engines' copies with
:mod:`~slaposha.replication.receiver`. What they share lives here:

- every copy is tagged with the fencing token (epoch) of the owner that
  sent it, and a standby refuses anything from an epoch older than the
  newest it has seen, so a deposed owner can never overwrite what the new
  owner wrote (:class:`StaleToken`);
- a transfer reports its progress (:class:`Progress`);
- errors are one line naming the volume, the peer and what failed
  (:class:`ReplicationError`);
- each keeps its state (tokens, copies, peers) in a JSON file locked
  against the host's other processes and threads (:func:`locked_state`).

The wire between hosts (TLS with the cluster's certificates, JSON headers,
framed streams) is in :mod:`slaposha.replication.wire`.
"""

import fcntl
import json
import os
import time
from collections import namedtuple
from contextlib import contextmanager

# Their users import them from here.
from slaposha.inputs import one_line as trim  # noqa: F401
from slaposha.units import human_bytes  # noqa: F401

__all__ = ['ReplicationError', 'StaleToken', 'Peer', 'Progress', 'trim',
           'human_bytes', 'locked_state', 'read_state']

# A standby to send to: the host's name (as in its certificate), the address
# and port of its receiver.
Peer = namedtuple('Peer', 'name address port')


class ReplicationError(Exception):
    """A replication step that failed, as one line:
    ``<volume> -> <peer>: <what failed>: <why>`` (``<-`` on the receiving
    side, no peer for a local step)."""

    def __init__(self, volume, message, peer=None, incoming=False):
        self.volume = volume
        self.message = message
        self.peer = peer
        self.incoming = incoming
        super().__init__(volume, message, peer, incoming)

    def __str__(self):
        if self.peer is None:
            return '%s: %s' % (self.volume, self.message)
        return '%s %s %s: %s' % (self.volume, '<-' if self.incoming else '->',
                                  self.peer, self.message)


class StaleToken(ReplicationError):
    """The other side has seen a newer epoch than the one offered: whoever
    offered it is no longer the owner."""


def read_state(path, defaults, error):
    """The JSON state in ``path`` with ``defaults()`` filled in (a missing
    file is empty); ``error(message)`` makes the exception to raise for an
    unreadable one."""
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = {}
    except (OSError, ValueError) as e:
        raise error('cannot read %s: %s' % (path, e))
    for key, value in defaults().items():
        state.setdefault(key, value)
    return state


@contextmanager
def locked_state(path, defaults, error, mode=0o777):
    """The state of ``path`` (:func:`read_state`), locked against the
    other processes and threads of the host (flock on a ``.lock`` beside
    it; its folder is made with ``mode``), written back atomically (fsync,
    rename) if changed: also after a failure, for what was done (a copy set
    aside) must be on record."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=mode, exist_ok=True)
    fd = os.open(os.path.join(folder, '.lock'), os.O_RDWR | os.O_CREAT,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = read_state(path, defaults, error)
        before = json.dumps(state, sort_keys=True)
        try:
            yield state
        finally:
            if json.dumps(state, sort_keys=True) != before:
                with open(path + '.tmp', 'w') as f:
                    json.dump(state, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(path + '.tmp', path)
    finally:
        os.close(fd)


class Progress(object):
    """One transfer as it goes: bytes sent, rate, and time left when the
    size is known (``total`` is an estimate: the stream is a little larger
    than the data it carries)."""

    def __init__(self, peer, snapshot, parent=None, total=None):
        self.peer = peer
        self.snapshot = snapshot
        self.parent = parent
        self.total = total
        self.sent = 0
        self.started = time.monotonic()
        self.ended = None
        self.failed = False

    @property
    def seconds(self):
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self):
        """Bytes per second since the start (0 before the first byte)."""
        seconds = self.seconds
        return self.sent / seconds if seconds > 0 else 0.0

    @property
    def eta(self):
        """Seconds left, or None when the size or the rate is unknown."""
        if self.ended is not None:
            return 0.0
        if not self.total or not self.rate:
            return None
        return max(0.0, (self.total - self.sent) / self.rate)

    def as_dict(self):
        return {'peer': self.peer, 'snapshot': self.snapshot,
                'parent': self.parent, 'total': self.total,
                'sent': self.sent, 'seconds': round(self.seconds, 3),
                'rate': round(self.rate), 'eta': self.eta,
                'done': self.ended is not None, 'failed': self.failed}

    def __str__(self):
        text = '%s to %s: %s' % (self.snapshot, self.peer,
                                 human_bytes(self.sent))
        if self.total:
            text += ' of ~%s' % human_bytes(self.total)
        text += ', %s/s' % human_bytes(self.rate)
        if self.eta is not None and self.ended is None:
            text += ', %.1f s left' % self.eta
        if self.failed:
            text += ' (failed)'
        return text
