"""``btrfs``: a btrfs subvolume copied to the standbys by snapshots.

The service's data (e.g. /srv/slapgrid, a btrfs subvolume) follows the
service: its owner snapshots it and sends each snapshot to the standbys,
incrementally, each standby at its own pace; at takeover the new owner
makes its newest complete copy the writable volume. The copies are
crash-consistent (what a power cut would leave). While the volume is
written, a snapshot follows as soon as a standby has the one before (no
sooner than ``min_interval``), and a crash loses the last few tenths of a
second of writes; an untouched volume gets a snapshot every ``interval``
(reference/replication.md; :mod:`slaposha.replication.volume`,
:mod:`~slaposha.replication.sender` and :mod:`~slaposha.replication.receiver`
for the engine, :mod:`slaposha.replication.pacer` for the schedule)::

    [btrfs#slapgrid]
    volume = /srv/slapgrid
    interval = 1s
    min_interval = 0.2s
    keep = 3
    minutely = 10
    hourly = 24
    daily = 7
    weekly = 4
    max_lag = 10s

Put it first in the service, so that it starts (promotes) before the
resources that use the data and stops (sends a last snapshot) after them.

What the agent does with it is the data drivers' contract
(:class:`~slaposha.resources.data.DataResource`): a receiver on ``port`` on
every host for the ``volume``, ``configure`` on the owner before
``start``, snapshots sent from ``start`` to ``stop`` in threads of their
own, ``lag`` and ``standby_status`` on the standbys.
"""

import logging
import os
import subprocess
import threading
import time

from slaposha.schema import REQUIRED, Key
from slaposha.replication import ReplicationError, human_bytes
from slaposha.replication.receiver import DEFAULT_PORT
from slaposha.replication.sender import Sender
from slaposha.replication.volume import Volume
from slaposha.replication.pacer import Pacer
from slaposha.replication.retention import DEFAULTS, Retention
from slaposha.units import human_seconds
from slaposha.resources import (
    DOWN, UP, WARN, ResourceError, Status, register)
from slaposha.resources.data import DIVERGED_KEYS, DataResource

__all__ = ['Btrfs']

logger = logging.getLogger(__name__)


@register
class Btrfs(DataResource):
    """a btrfs subvolume copied to the standbys by snapshots every interval"""

    kind = 'btrfs'
    keys = (
        Key('volume', 'path', REQUIRED, 'the btrfs subvolume to replicate,'
            ' e.g. /srv/slapgrid; its snapshots are kept in .slaposha/ at the'
            ' root of its file system'),
        Key('port', 'integer', DEFAULT_PORT, 'TCP port of the receivers'
            ' (every host runs one)', minimum=1, maximum=65535),
        Key('interval', 'duration', 1.0, 'an untouched volume gets a'
            ' snapshot this often; a standby whose copies keep failing is'
            ' tried again this often', minimum=0.1),
        Key('min_interval', 'duration', 0.2, 'while the volume is written,'
            ' the next snapshot is taken as soon as a standby has the one'
            ' before, but no sooner than this (at most interval) after it:'
            ' a crash loses about this plus a transfer of writes; a floor'
            ' on the owner\'s cost', minimum=0.0),
        Key('keep', 'integer', 3, 'snapshots kept on each host, besides the'
            ' newest one each peer has (kept so that the next send to it is'
            ' incremental)', minimum=1),
        Key('minutely', 'integer', DEFAULTS['minutely'], 'snapshots kept as'
            ' backups on every host that holds a copy: the first of each of'
            ' the newest this many minutes (UTC) that have one; 0: none',
            minimum=0),
        Key('hourly', 'integer', DEFAULTS['hourly'], 'the same, of hours',
            minimum=0),
        Key('daily', 'integer', DEFAULTS['daily'], 'the same, of days',
            minimum=0),
        Key('weekly', 'integer', DEFAULTS['weekly'], 'the same, of weeks'
            ' (from Monday)', minimum=0),
        Key('max_lag', 'duration', None, 'status warns when a standby\'s'
            ' copy is older than this'),
        Key('timeout', 'duration', 30.0, 'a transfer that makes no progress'
            ' for this long is given up (the next cycle retries)',
            minimum=1.0),
        Key('stop_timeout', 'duration', 30.0, 'time stop gives the last'
            ' snapshot to reach the standbys', minimum=0.0),
    ) + DIVERGED_KEYS

    @classmethod
    def validate(cls, section):
        if section.volume == '/':
            return 'volume: must be a subvolume below a file system root,' \
                ' not /'
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.volume = Volume(section.volume)
        self.volume.retention = Retention(section.minutely, section.hourly,
                                          section.daily, section.weekly)
        self.sender = None
        self.pacer = None
        self.started = None       # wall clock of start
        # The latest of each standby, as a Cycle: its last Transfer or
        # error, the snapshot, when it was taken and how long it took to
        # reach the standby of the latest one.
        self.last = None
        # {peer: [bytes, seconds, transfers]} sent since the agent began,
        # for the metrics
        self.sent = {}
        # Given each Cycle the pacer reports (the lab's owner records them).
        self.observers = []
        self._nested = ([], 0.0)   # (nested subvolumes, next look)
        self._reported = threading.Lock()  # the pacer's threads report

    # -- what the agent gives -------------------------------------------------

    def configure(self, token, peers, tls, host):
        super().configure(token, peers, tls, host)
        if self.sender is not None:
            self.sender.peers = self.peers
            self.pacer.refresh()

    def receiver(self):
        # The volume itself: its retention applies to what this host
        # receives.
        return self.conf.port, [self.volume], []

    # -- verbs ----------------------------------------------------------------

    def start(self):
        self._check_configured()
        try:
            done = self.volume.activate(self.token, self.host)
        except ReplicationError as e:
            raise ResourceError('%s: %s' % (self.rid, e))
        logger.info('%s: %s', self.rid, done)
        self.sender = Sender(self.volume, self.token, self.peers, self.tls,
                             self.host, keep=self.conf.keep,
                             timeout=self.conf.timeout)
        self.running = True
        self.handover = None
        self.started = time.time()
        self.last = self.failure = None
        self.pacer = Pacer(self.sender, self.conf.interval,
                           self.conf.min_interval, self._report).start()

    def _report(self, cycle):
        """What the pacer's threads report: see Pacer."""
        with self._reported:
            self._take_note(cycle)
        for observer in self.observers:
            observer(cycle)

    def _take_note(self, cycle):
        if cycle.snapshot is None:
            self.failure = cycle.errors[None]
            self._say(str(self.failure), 'snapshot')
        elif None in cycle.errors:
            self._say(str(cycle.errors[None]), 'pruning')
        elif not cycle.results and not cycle.errors:
            self.failure = None
            self._say(None, 'snapshot')
        results = dict(self.last.results) if self.last else {}
        errors = dict(self.last.errors) if self.last else {}
        for peer, transfer in cycle.results.items():
            errors.pop(peer, None)
            results[peer] = transfer
            self._say(None, peer)
            if not transfer.skipped:
                total = self.sent.setdefault(peer, [0, 0.0, 0])
                total[0] += transfer.bytes
                total[1] += transfer.seconds
                total[2] += 1
        for peer, error in cycle.errors.items():
            if peer is not None:
                results.pop(peer, None)
                errors[peer] = error
                self._say(str(error), peer)
        if cycle.results or cycle.errors.keys() - {None}:
            self.last = cycle._replace(results=results, errors=errors)

    def stop(self):
        """End the cycles and send a last snapshot (the applications were
        stopped before: it is the final state) to each standby that
        answers, within stop_timeout. Never fails for a standby that did
        not answer: status says it."""
        was_running, self.running = self.running, False
        started = time.monotonic()
        deadline = started + self.conf.stop_timeout
        if self.pacer is not None:
            left = max(0.0, self.conf.stop_timeout)
            self.sender.timeout = min(self.conf.timeout, left) or 0.1
            self.sender.connect_timeout = min(3.0, left) or 0.1
            last = was_running and self.volume.exists()
            final = self.pacer.stop(deadline, last=last, lost=self.lost)
            if last:
                self.handover = dict((p.name, final.get(p.name))
                                     for p in self.peers)
            sent = sorted(p for p, t in final.items()
                          if not isinstance(t, ReplicationError))
            if sent:
                logger.info('%s: last snapshot %s sent to %s', self.rid,
                            final[sent[0]].snapshot, ', '.join(sent))
            for peer, error in sorted(final.items()):
                if peer not in sent and error.message.startswith(
                        'hand-over to '):
                    logger.warning('%s: %s, %.1f s into the stop (its copy'
                                   ' stays %s)', self.rid, error.message,
                                   time.monotonic() - started,
                                   self.sender.lag(peer)[1] or 'none')
        self._deactivate()

    def _deactivate(self):
        # Not a failed stop: with its file system gone, nothing can be
        # received here anyway, and the senders say why they are refused.
        try:
            self.volume.deactivate()
        except (ReplicationError, OSError) as e:
            logger.warning('%s: cannot mark the volume free: %s',
                           self.rid, e)

    def fence(self):
        """Stop at once: the transfer going on is cut (the standby drops
        it), no last snapshot. The volume is marked free in the background:
        that takes a lock, and fencing waits for nothing."""
        self.running = False
        if self.pacer is not None:
            self.pacer.abort()
        threading.Thread(target=self._deactivate, daemon=True).start()

    def fence_targets(self):
        return [], []

    def provision(self):
        """Create the volume (an empty subvolume) when it is missing and no
        snapshot could make it."""
        try:
            if not self.volume.exists() and self.volume.newest() is None:
                self.volume._run(['subvolume', 'create', self.volume.path],
                                 'cannot create the volume')
        except ReplicationError as e:
            raise ResourceError('%s: %s' % (self.rid, e))

    # -- what it says ---------------------------------------------------------

    def progress(self):
        """The transfer going on or the last one (a Progress), or None."""
        return self.sender.progress if self.sender is not None else None

    def lag(self):
        """(seconds, snapshot) of this host's newest complete copy: on a
        standby, how old its data is."""
        return self.volume.freshness()

    def status(self):
        if not self.running:
            return Status(DOWN, 'not replicating on this host')
        if not self.volume.exists():
            return Status(WARN, '%s is missing' % self.volume.path)
        if self.failure is not None:
            return Status(WARN, str(self.failure))
        if not self.peers:
            return Status(WARN, 'no standby to send %s to'
                          % self.volume.path)
        warn, parts = False, []
        nested = self.nested()
        if nested:
            warn = True
            parts.append('not replicated: %s, nested subvolume%s (a btrfs'
                         ' snapshot stops at a subvolume: make %s a folder)'
                         % (', '.join(nested[:3]) + (' and %d more' % (
                             len(nested) - 3) if len(nested) > 3 else ''),
                            's' if len(nested) > 1 else '',
                            'them' if len(nested) > 1 else 'it'))
        for peer in self.peers:
            lag, name = self.sender.lag(peer.name)
            last = self.sender.last.get(peer.name)
            if isinstance(last, ReplicationError):
                warn = True
                parts.append('%s: %s' % (peer.name, last.message))
                if lag is not None:
                    parts[-1] += ' (its copy %s is %s old)' % (
                        name, human_seconds(lag))
                continue
            if lag is None:
                warn = warn or (self.last is not None)
                parts.append('%s: no copy yet' % peer.name)
                continue
            if self.conf.max_lag is not None and lag > self.conf.max_lag:
                warn = True
                parts.append('%s: copy %s is %s old (max_lag %s)' % (
                    peer.name, name, human_seconds(lag),
                    human_seconds(self.conf.max_lag)))
            else:
                parts.append('%s: %s, %s old' % (peer.name, name,
                                                 human_seconds(lag)))
        # A copy that takes a while (a full one) shows how it goes; the
        # many short ones would only flicker.
        going = [p for _, p in sorted(self.sender.sending.items())
                 if p.seconds >= 1.0]
        for progress in going:
            parts.append('sending %s' % progress)
        if not going and self.last is not None and self.last.results:
            sent = sum(t.bytes for t in self.last.results.values())
            parts.append('last cycle %s, %s' % (human_seconds(self.last.seconds),
                                                 human_bytes(sent)))
        backups = self.backups()
        if backups:
            parts.append(backups)
        return Status(WARN if warn else UP, '; '.join(parts))

    def nested(self):
        """The subvolumes inside the volume (paths below it), looked for
        every NESTED_EVERY seconds: snapshots, so the standbys, have an
        empty folder in their place."""
        found, due = self._nested
        now = time.monotonic()
        if now >= due:
            found = nested_subvolumes(self.volume)
            self._nested = (found, now + NESTED_EVERY)
        return found

    def standby_status(self):
        """On a host where the service does not run: the age of its copy
        and what diverged copies were kept aside."""
        try:
            lag, name = self.volume.freshness()
            diverged = self.volume.diverged()
        except (ReplicationError, OSError) as e:
            return Status(WARN, str(e))
        return self._copy_status(
            'copy %s' % name, lag, diverged, missing=name is None and
            'no copy of %s here' % self.volume.path,
            notes=[n for n in [self.backups()] if n])

    def backups(self):
        """'backups: N snapshots kept here since <oldest> UTC' (how far back
        a restore can go on this host), or '' when none is dated."""
        try:
            snapshots = self.volume.snapshots()
            dated = [self.volume.meta(s.name).get('created')
                     for s in snapshots]
        except (ReplicationError, OSError):
            return ''
        dated = [d for d in dated if isinstance(d, (int, float))]
        if not dated:
            return ''
        return 'backups: %d snapshot(s) kept here since %s UTC' % (
            len(snapshots), time.strftime('%Y-%m-%d %H:%M:%S',
                                          time.gmtime(min(dated))))


# Seconds between two looks for subvolumes inside a volume (a `btrfs
# subvolume list`, a few milliseconds).
NESTED_EVERY = 10.0


def nested_subvolumes(volume):
    """Paths, relative to ``volume``, of the subvolumes directly inside it
    (``btrfs subvolume list -o``); [] when it cannot be told."""
    try:
        p = subprocess.run(['btrfs', 'subvolume', 'list', '-o', volume.path],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True, timeout=10)
        own = os.path.relpath(volume.path, volume.root)
    except (OSError, subprocess.TimeoutExpired, ReplicationError):
        return []
    if p.returncode:
        return []
    found = []
    for line in p.stdout.splitlines():
        path = line.partition(' path ')[2].strip()
        if path.startswith('<FS_TREE>/'):
            path = path[len('<FS_TREE>/'):]
        if path.startswith(own + '/'):
            path = path[len(own) + 1:]
        if path:
            found.append(path)
    return sorted(found)
