"""``rsync``: a folder copied to the standbys by rsync every interval.

For hosts without btrfs (the ``btrfs`` driver is the default, DESIGN.md 3):
the owner pushes the folder to every standby of the service, with the real
rsync binary, over the cluster's TLS channel and tagged with its fencing
token (:mod:`slaposha.replication.push` for the engine,
:mod:`slaposha.replication.tree` for the standby's two copies and what
makes a copy complete)::

    [rsync#data]
    path = /srv/slapgrid/data
    interval = 10s
    source = auto

Put it first in the service, so that it starts (takes over the newest
complete copy) before the resources that use the data and stops (sends a
last copy, the applications stopped) after them.

Consistency (reference/replication.md section 1): ``source = auto`` copies
from a read-only btrfs snapshot when ``path`` is a btrfs subvolume
(crash-consistent, what a power cut would leave), else the live folder, and
a live rsync is **not crash-consistent**: a database being written while it
is copied can come out torn; ``status`` says so. ``source = stopped`` copies
only while the applications are stopped (at ``stop``, after them): every
copy is consistent, and a crash loses everything since the last stop. The
last copy that ``stop`` sends is consistent in every mode.

The agent uses it as the ``btrfs`` driver (the data drivers' contract,
:class:`~slaposha.resources.data.DataResource`): its receiver on ``port``
serves the tree, ``configure`` before ``start``, ``tick`` every cycle,
``lag`` and ``standby_status`` on the standbys; ``[service] max_lag`` makes
a standby with an older copy ineligible, and ``slaposha takeover --force``
overrides it.
"""

import logging
import os
import signal
import subprocess
import threading
import time

from slaposha.schema import REQUIRED, Key
from slaposha.replication import ReplicationError, StaleToken, trim
from slaposha.replication.receiver import DEFAULT_PORT
from slaposha.replication.pacer import LOST_POLL
from slaposha.replication.push import Transfer, push
from slaposha.replication.tree import Tree, is_subvolume
from slaposha.resources import (
    DOWN, UP, WARN, ResourceError, Status, register)
from slaposha.resources.data import DIVERGED_KEYS, DataResource
from slaposha.units import human_seconds

__all__ = ['Rsync']

logger = logging.getLogger(__name__)

NOT_CONSISTENT = 'live rsync: not crash-consistent (a database written' \
    ' during a copy can come out torn)'


@register
class Rsync(DataResource):
    """a folder copied to the standbys by rsync over TLS every interval"""

    kind = 'rsync'
    ticks = True
    keys = (
        Key('path', 'path', REQUIRED, 'the folder to replicate, e.g.'
            ' /srv/slapgrid/data; not a mount point (takeover renames the'
            ' newest copy to it)'),
        Key('store', 'path', None, 'where a standby keeps its two copies'
            ' (up to twice the folder\'s size); on the file system of'
            ' path\'s parent; default <parent>/.slaposha-rsync/<name>'),
        Key('port', 'integer', DEFAULT_PORT, 'TCP port of the receivers'
            ' (every host runs one, shared with btrfs)', minimum=1,
            maximum=65535),
        Key('interval', 'duration', 10.0, 'a copy is sent this often (from'
            ' the start of the previous one); a crash loses about two'
            ' intervals of writes', minimum=0.5),
        Key('source', 'choice', 'auto', 'auto: from a read-only snapshot'
            ' when path is a btrfs subvolume, else live (not'
            ' crash-consistent); snapshot: always (start fails without);'
            ' live; stopped: only at stop, after the applications',
            choices=['auto', 'snapshot', 'live', 'stopped']),
        Key('max_lag', 'duration', None, 'status warns when a standby\'s'
            ' copy is older than this'),
        Key('timeout', 'duration', 60.0, 'a transfer that moves no byte for'
            ' this long is given up (the next interval retries)',
            minimum=1.0),
        Key('stop_timeout', 'duration', 60.0, 'time stop gives the last copy'
            ' to reach the standbys', minimum=0.0),
    ) + DIVERGED_KEYS

    @classmethod
    def validate(cls, section):
        if section.path == '/':
            return 'path: must be a folder below /, not /'
        if section.store is not None and (
                section.store == section.path or section.store.startswith(
                    section.path + '/')):
            return 'store: must be outside path (%s)' % section.path
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.tree = Tree(section.path, section.store)
        self.volume = self.tree     # DataResource names the data so
        self.mode = None            # snapshot | live | stopped, at start
        self.last = {}              # peer: Transfer or ReplicationError
        self.cycle_seconds = None
        self._abort = threading.Event()
        self._procs = set()
        self._lock = threading.Lock()
        self._pushing = None        # the standby a copy goes to now
        self._cut = set()           # standbys lost during the stop

    def receiver(self):
        return self.conf.port, [], [self.tree]

    # -- verbs ----------------------------------------------------------------

    def _mode(self):
        source = self.conf.source
        if source in ('auto', 'snapshot'):
            if is_subvolume(self.tree.path):
                return 'snapshot'
            if source == 'snapshot':
                raise ResourceError('%s: source = snapshot, but %s is not a'
                                    ' btrfs subvolume' % (self.rid,
                                                          self.tree.path))
            return 'live'
        return source

    def start(self):
        self._check_configured()
        try:
            done = self.tree.activate(self.token, self.host)
        except ReplicationError as e:
            raise ResourceError('%s: %s' % (self.rid, e))
        except OSError as e:
            raise ResourceError('%s: cannot take over %s: %s' % (
                self.rid, self.tree.path, e.strerror or e))
        self.mode = self._mode()
        logger.info('%s: %s; copies %s', self.rid, done, {
            'snapshot': 'from read-only snapshots',
            'live': 'live: not crash-consistent',
            'stopped': 'at stop only'}[self.mode])
        self._abort = threading.Event()
        self._cut = set()
        self.running = True
        self.handover = None
        self.last, self.failure, self.cycle_seconds = {}, None, None
        self._next = time.monotonic()

    def tick(self):
        """Begin a copy to the standbys when one is due and none is
        running. Never blocks."""
        if self.mode == 'stopped' or not self._cycle_due():
            return
        self._thread = threading.Thread(target=self._cycle, args=(self.mode,),
                                        name='%s cycle' % self.rid,
                                        daemon=True)
        self._thread.start()

    def _cycle(self, mode):
        started = time.monotonic()
        try:
            self._send_all(mode)
            self.failure = None
        except ReplicationError as e:
            self.failure = e
        except Exception as e:  # a thread's error must reach status
            self.failure = ReplicationError(self.tree.path, 'cycle failed:'
                                            ' %s' % e)
            logger.exception('%s: cycle failed', self.rid)
        self.cycle_seconds = time.monotonic() - started
        problems = [str(e) for e in self.last.values()
                    if isinstance(e, ReplicationError)]
        if self.failure is not None:
            problems.insert(0, str(self.failure))
        self._say('; '.join(problems) or None)

    def _send_all(self, mode):
        """One copy to every standby; each one's result in ``last``."""
        snapshot = None
        created = time.time()
        source = self.tree.path
        if not os.path.isdir(source):
            raise ReplicationError(source, 'missing: nothing to send')
        if mode == 'snapshot':
            snapshot = os.path.join(self.tree.store, '.snapshot-%d' % (
                os.getpid()))
            self._btrfs(['subvolume', 'delete', snapshot], check=False)
            created = time.time()
            self._btrfs(['subvolume', 'snapshot', '-r', source, snapshot])
            source = snapshot
        try:
            for peer in self.peers:
                if self._abort.is_set():
                    break
                if peer.name in self._cut:
                    self.last[peer.name] = self._cut_error(peer.name)
                    continue
                with self._lock:
                    self._pushing = peer.name
                try:
                    self.last[peer.name] = push(
                        self.tree, peer, self.tls, self.host, self.token,
                        source, created, mode, self.conf.timeout,
                        abort=self._abort, on_start=self._started)
                except StaleToken as e:
                    self.last[peer.name] = e
                    logger.warning('%s: %s: this host is no longer the'
                                   ' owner', self.rid, e)
                except ReplicationError as e:
                    self.last[peer.name] = self._cut_error(peer.name) \
                        if peer.name in self._cut else e
                finally:
                    with self._lock:
                        self._pushing = None
        finally:
            if snapshot is not None:
                self._btrfs(['subvolume', 'delete', snapshot], check=False)

    def _btrfs(self, args, check=True):
        p = subprocess.run(['btrfs'] + args, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           universal_newlines=True)
        if check and p.returncode:
            raise ReplicationError(self.tree.path, 'btrfs %s: %s' % (
                args[1], trim(p.stdout)))

    def _started(self, proc):
        with self._lock:
            self._procs.add(proc)
            if self._abort.is_set():
                self._kill(proc)

    @staticmethod
    def _kill(proc):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def _abort_transfers(self):
        self._abort.set()
        self._kill_transfers()

    def _kill_transfers(self, to=None):
        """Kill the copy going on (with ``to``, only if it goes to that
        standby)."""
        with self._lock:
            if to is not None and self._pushing != to:
                return
            procs, self._procs = list(self._procs), set()
        for proc in procs:
            self._kill(proc)

    def stop(self):
        """End the cycles, then send a last copy (the applications were
        stopped before: it is consistent) when the standbys answer, within
        stop_timeout; the copy to a standby known lost (``peer_lost``: its
        host holds no lease) is cut then, or skipped. Never fails for a
        standby that did not answer: status says it; only a stop whose last
        copy reached every standby lets this host's folder be reused
        without keeping it aside."""
        was_running, self.running = self.running, False
        started = time.monotonic()
        deadline = started + self.conf.stop_timeout
        self._cut = set()
        done = threading.Event()
        watch = threading.Thread(target=self._watch_stop, args=(
            done, deadline), name='%s stop' % self.rid, daemon=True)
        watch.start()
        try:
            if self._thread is not None:
                self._thread.join(max(0.0, deadline - time.monotonic()))
                if self._thread.is_alive():
                    self._abort_transfers()
                    self._thread.join(5)
            clean = False
            if was_running and self.peers and self.tree.exists():
                self.handover = dict((p.name, None) for p in self.peers)
            if self.handover and not self._abort.is_set() and \
                    time.monotonic() < deadline:
                self.last = {}
                self._cycle('stopped')
                self.handover = dict((p.name, self.last.get(p.name))
                                     for p in self.peers)
                clean = all(isinstance(self.last.get(p.name), Transfer)
                            for p in self.peers)
                if clean:
                    logger.info('%s: last copy sent to %s', self.rid,
                                ', '.join(p.name for p in self.peers))
        finally:
            done.set()
        for name in sorted(n for n in self._cut if not isinstance(
                self.last.get(n), Transfer)):
            logger.warning('%s: %s, %.1f s into the stop', self.rid,
                           self._cut_error(name).message,
                           time.monotonic() - started)
        self._deactivate(clean)

    def _watch_stop(self, done, deadline):
        """While ``stop`` runs (until ``done``): the copy going to a standby
        known lost is cut at once, every copy at ``deadline``."""
        while not done.wait(LOST_POLL):
            if time.monotonic() >= deadline:
                self._abort_transfers()
                return
            for peer in self.peers:
                if peer.name not in self._cut and self.lost(peer.name):
                    self._cut.add(peer.name)
                    self._kill_transfers(peer.name)

    def _cut_error(self, name):
        return ReplicationError(self.tree.path, 'hand-over to %s cut: %s'
                                ' lost' % (name, name), name)

    def _deactivate(self, clean=False):
        try:
            self.tree.deactivate(clean)
        except (ReplicationError, OSError) as e:
            logger.warning('%s: cannot mark the tree free: %s', self.rid, e)

    def fence(self):
        """Stop at once: the transfers going on are killed (the standbys
        keep their complete copy), no last copy."""
        self.running = False
        self._abort_transfers()
        threading.Thread(target=self._deactivate, daemon=True).start()

    def fence_targets(self):
        return [], []

    def provision(self):
        """Check that the store can hold the copies and make it."""
        problem = self.tree.check_layout()
        if problem:
            raise ResourceError('%s: %s' % (self.rid, problem))

    # -- what it says ---------------------------------------------------------

    def lag(self):
        """(seconds, label) of this host's newest complete copy: on a
        standby, how old its data is."""
        return self.tree.freshness()

    def status(self):
        if not self.running:
            return Status(DOWN, 'not replicating on this host')
        if not self.tree.exists():
            return Status(WARN, '%s is missing' % self.tree.path)
        if self.failure is not None:
            return Status(WARN, str(self.failure))
        tail = {'snapshot': 'from read-only snapshots',
                'live': NOT_CONSISTENT,
                'stopped': 'copies at stop only'}[self.mode]
        if not self.peers:
            return Status(WARN, 'no standby to send %s to; %s' % (
                self.tree.path, tail))
        warn, parts = False, []
        for peer in self.peers:
            last = self.last.get(peer.name)
            if isinstance(last, ReplicationError):
                warn = True
                parts.append('%s: %s' % (peer.name, last.message))
            elif last is None:
                warn = warn or (self.mode != 'stopped' and
                                self.cycle_seconds is not None)
                parts.append('%s: no copy yet' % peer.name)
            else:
                lag = max(0.0, time.time() - last.created)
                if self.conf.max_lag is not None and lag > self.conf.max_lag:
                    warn = True
                    parts.append('%s: copy is %s old (max_lag %s)' % (
                        peer.name, human_seconds(lag),
                        human_seconds(self.conf.max_lag)))
                else:
                    parts.append('%s: copy %s old' % (peer.name,
                                                      human_seconds(lag)))
        if self.cycle_seconds is not None:
            parts.append('last cycle %s' % human_seconds(self.cycle_seconds))
        parts.append(tail)
        return Status(WARN if warn else UP, '; '.join(parts))

    def standby_status(self):
        """On a host where the service does not run: the age of its copy
        and what was kept aside."""
        try:
            lag, label = self.tree.freshness()
            name, record = self.tree.newest()
            diverged = self.tree.diverged()
        except (ReplicationError, OSError) as e:
            return Status(WARN, str(e))
        live = record is not None and record.get('mode') == 'live'
        return self._copy_status(
            label, lag, diverged, missing=record is None and
            'no complete copy of %s here' % self.tree.path,
            notes=[NOT_CONSISTENT] if live else [])
