"""When the owner takes a snapshot, and when each standby gets it.

A :class:`~slaposha.replication.sender.Sender` knows how to take a snapshot
and send it to one standby; the :class:`Pacer` runs it without pause, from
the service's start to its stop. Before it, a cycle (a snapshot sent to
each standby in turn, then the pruning) began every ``interval``: a crash
lost up to an interval and a cycle of writes (1.2 to 1.6 s at 10 MB/s with
a 1 s interval, benchmarks/RESULTS.md), and a dead standby (3 s until the
connection gives up) made every cycle, so every other standby's copy, that
much later. Now:

- each standby has a thread of its own that sends it the newest snapshot
  as soon as it has the one before: a slow or dead standby delays only its
  own copy, and when it answers again it gets the newest snapshot,
  incrementally from the one it has (those it missed are skipped); one
  whose send failed is tried again ``min_interval`` later, then twice as
  late after each failure, up to ``interval``;
- a snapshot is taken when a standby waits for one (or, with none, every
  ``interval``): while the volume is being written (the last snapshot sent
  changed something), at once, but no sooner than ``min_interval`` after
  the one before; otherwise ``interval`` after it, so that an untouched
  volume costs one small cycle an interval, as before.

So while the volume is written, a crash loses the writes of about
max(``min_interval``, one transfer) + one transfer (a transfer: from a
snapshot to the standby's answer that it has it, synced); the first writes
after a quiet spell wait for the interval, as before.
"""

import logging
import threading
import time

from slaposha.replication import ReplicationError
from slaposha.replication.sender import Cycle

__all__ = ['Pacer']

logger = logging.getLogger(__name__)

# Seconds between two looks, while the last snapshot goes out, at whether
# the standbys still being sent to are lost.
LOST_POLL = 0.1


class _Standby(object):
    """What the pacer knows of one standby's thread."""

    def __init__(self, name):
        self.name = name
        self.busy = False    # a send is going on
        self.tried = None    # the snapshot it was last sent (or tried)
        self.retry = 0.0     # monotonic time before which it is not tried
        self.failed = 0      # sends that failed in a row
        # The thread ends: no longer a peer, or failed while stopping.
        self.gone = False
        self.thread = None


class Pacer(object):
    """Runs ``sender`` from :meth:`start` to :meth:`stop` (or
    :meth:`abort`), with ``interval`` and ``min_interval`` as above.

    ``report(cycle)`` is called, in the pacer's threads, with a
    :data:`~slaposha.replication.sender.Cycle` for each event: a snapshot
    taken (no results, no errors); a send to a standby (its Transfer in
    ``results`` or its ReplicationError in ``errors``, under its name;
    ``started``: when the snapshot was taken, wall clock; ``seconds``: from
    then to the standby's answer); the snapshot or the pruning failed (the
    error under None; ``snapshot`` None when the snapshot failed).
    """

    def __init__(self, sender, interval, min_interval, report):
        self.sender = sender
        self.interval = interval
        self.min_interval = min(min_interval, interval)
        self.report = report
        self._cond = threading.Condition()
        self._standbys = {}
        self._newest = None     # (Snapshot, wall clock when taken)
        self._taken = None      # monotonic time the newest one began
        self._written = False   # the newest one sent changed something
        self._stopping = False
        self._final = None      # once stopping: (Snapshot, when), or False
        self._outcome = {}      # {peer name: Transfer or error} of it
        self._taker = None

    def __repr__(self):
        return '<Pacer %s>' % self.sender.volume

    # -- life cycle -----------------------------------------------------------

    def start(self):
        self._taker = self._thread(self._take, 'snapshots')
        self.refresh()
        return self

    def refresh(self):
        """Follow the sender's peers as they change: a new one gets a
        thread; one that left ends after the send it is busy with (and
        goes on if it comes back meanwhile: one thread per standby)."""
        names = set(peer.name for peer in self.sender.peers)
        with self._cond:
            if self._stopping or self._taker is None:
                return
            for name, standby in self._standbys.items():
                standby.gone = name not in names
            for name in sorted(names - set(self._standbys)):
                standby = self._standbys[name] = _Standby(name)
                standby.thread = self._thread(self._follow, 'to ' + name,
                                              standby)
            self._cond.notify_all()

    def _present(self):
        return [s for s in self._standbys.values() if not s.gone]

    def stop(self, deadline, last=True, lost=None):
        """No more snapshots; with ``last``, a final one, which each
        standby gets after the send it is busy with. Past ``deadline``
        (monotonic) the sends going on are cut, and as soon as every
        standby still being sent to is known lost (``lost(name)``, which
        must not raise, is true: for the agent, its host holds no lease):
        waiting longer could only delay the service, and that host cannot
        run it. Returns {peer name: Transfer or ReplicationError} of the
        final snapshot; a standby cut for being lost has the error
        'hand-over to NAME cut: NAME lost'."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            standbys = self._present()
        if self._taker is not None:
            self._taker.join(max(0.0, deadline - time.monotonic()))
        final = False
        if last and standbys and (self._taker is None or
                                  not self._taker.is_alive()) and \
                time.monotonic() < deadline:
            final = self._snapshot()
        with self._cond:
            self._final = final or False
            self._cond.notify_all()
        cut = []
        while time.monotonic() < deadline:
            busy = [s for s in standbys if s.thread.is_alive()]
            if not busy:
                break
            if lost is not None and all(lost(s.name) for s in busy):
                cut = busy
                break
            busy[0].thread.join(min(LOST_POLL, max(
                0.0, deadline - time.monotonic())))
        if any(s.thread.is_alive() for s in standbys):
            self.sender.abort()
            for standby in standbys:
                standby.thread.join(5)
        self._prune()
        with self._cond:
            for standby in cut:
                self._outcome[standby.name] = ReplicationError(
                    self.sender.volume.path, 'hand-over to %s cut: %s lost'
                    % (standby.name, standby.name), standby.name)
            return dict(self._outcome)

    def abort(self):
        """End at once: the sends going on are cut, nothing more is
        sent."""
        with self._cond:
            self._stopping = True
            self._final = False
            self._cond.notify_all()
        self.sender.abort()

    # -- the threads ----------------------------------------------------------

    def _thread(self, target, what, *args):
        thread = threading.Thread(target=self._guard, args=(target,) + args,
                                  name='%s %s' % (self.sender.volume.name,
                                                  what), daemon=True)
        thread.start()
        return thread

    def _guard(self, target, *args):
        """A thread's loop; an unexpected error is reported, and the loop
        goes on after an interval: replication degrades, never stops."""
        while True:
            try:
                return target(*args)
            except Exception as e:
                logger.exception('%s: replication thread failed', self)
                try:
                    self.report(self._cycle(None, time.time(), errors={
                        None: ReplicationError(self.sender.volume.path,
                                               'replication thread failed:'
                                               ' %s' % e)}))
                except Exception:
                    pass
                time.sleep(self.interval)

    def _take(self):
        """The snapshots, each when due (see the module's docstring)."""
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    wait = self._due()
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                self._taken = time.monotonic()
            newest = self._snapshot()
            with self._cond:
                if newest:
                    self._newest = newest
                else:
                    self._written = False  # tried again an interval later
                self._cond.notify_all()
            if newest:
                self._prune()

    def _due(self):
        """Seconds until the next snapshot is due (<= 0: now), or None
        while no standby waits for one."""
        now = time.monotonic()
        ready = now
        standbys = self._present()
        if standbys:
            newest = self._newest and self._newest[0].name
            waiting = [s.retry for s in standbys
                       if not s.busy and s.tried == newest]
            if not waiting:
                return None
            ready = max(now, min(waiting))
        if self._taken is None:
            return ready - now
        pace = self.min_interval if self._written else self.interval
        return max(self._taken + pace, ready) - now

    def _follow(self, standby):
        """One standby's thread: the newest snapshot, each time there is
        one it has not been sent."""
        while True:
            with self._cond:
                while True:
                    if standby.gone:
                        if self._standbys.get(standby.name) is standby:
                            del self._standbys[standby.name]
                        return
                    if self._stopping:
                        if self._final is None:
                            self._cond.wait()  # the final one is coming
                            continue
                        if not self._final or \
                                standby.tried == self._final[0].name:
                            return
                        snap, when = self._final
                        break
                    newest = self._newest
                    if newest is not None and \
                            newest[0].name != standby.tried:
                        wait = standby.retry - time.monotonic()
                        if wait <= 0:
                            snap, when = newest
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                standby.busy, standby.tried = True, snap.name
            results, errors = {}, {}
            try:
                results[standby.name] = self._send(standby.name, snap)
            except ReplicationError as e:
                errors[standby.name] = e
            with self._cond:
                standby.busy = False
                transfer = results.get(standby.name)
                if transfer is None:
                    standby.failed += 1
                    standby.retry = time.monotonic() + self._backoff(
                        standby.failed)
                    # Failed while stopping: no second try for the final
                    # snapshot (a dead standby would double the stop).
                    standby.gone = standby.gone or self._stopping
                else:
                    standby.failed = 0
                    if not transfer.skipped and self._newest and \
                            snap.name == self._newest[0].name:
                        self._written = bool(transfer.changed)
                if self._final and snap.name == self._final[0].name:
                    self._outcome[standby.name] = transfer or \
                        errors[standby.name]
                self._cond.notify_all()
            self.report(self._cycle(snap, when, results, errors))

    def _backoff(self, failed):
        """How long a standby whose last ``failed`` sends failed waits
        before the next: min_interval (0.05 s at least), doubled at each
        failure, up to interval: a refusal because the standby was busy
        costs little, and a dead one is soon tried only every interval, as
        before."""
        first = max(self.min_interval, 0.05)
        return min(self.interval, first * 2 ** min(failed - 1, 16))

    # -- steps ----------------------------------------------------------------

    def _failed(self, what, e, peer=None):
        """Any error of a step as a ReplicationError (one line)."""
        if isinstance(e, ReplicationError):
            return e
        if not isinstance(e, OSError):
            logger.exception('%s: %s failed', self, what)
        return ReplicationError(self.sender.volume.path, '%s failed: %s' % (
            what, getattr(e, 'strerror', None) or e), peer)

    def _send(self, name, snap):
        peer = [p for p in self.sender.peers if p.name == name]
        if not peer:
            raise ReplicationError(self.sender.volume.path, 'no longer a'
                                   ' standby', name)
        try:
            return self.sender.send(peer[0], snap)
        except Exception as e:
            raise self._failed('send %s' % snap.name, e, name)

    def _snapshot(self):
        """A new snapshot, (Snapshot, when), reported; None when it
        failed."""
        when = time.time()
        try:
            snap = self.sender.volume.snapshot(self.sender.token,
                                               self.sender.host)
        except Exception as e:
            self.report(self._cycle(None, when, errors={
                None: self._failed('snapshot', e)}))
            return None
        self.report(self._cycle(snap, when))
        return snap, when

    def _prune(self):
        try:
            self.sender.prune()
        except Exception as e:
            newest = self._newest or (None, time.time())
            self.report(self._cycle(newest[0], newest[1], errors={
                None: self._failed('pruning', e)}))

    @staticmethod
    def _cycle(snap, when, results=None, errors=None):
        return Cycle(snap, when, time.time() - when, results or {},
                     errors or {})
