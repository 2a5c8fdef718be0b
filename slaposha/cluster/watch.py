"""The cluster as the agent sees it: hosts and services, followed by an
etcd watch (DESIGN.md 8) instead of read again every cycle.

A thread reads the hosts and services keys once, then follows their changes
with a watch from the revision after that read; the agent's loop reads
this cache, which costs nothing, and is woken by each change::

    world = ClusterWatch(client, keys, resync_interval=10, on_change=wake)
    world.start()
    views, alive = world.read(at_least=loop_client.last_change)

What keeps the cache true:

- a watch that breaks resumes on the next endpoint from the revision after
  its last event (:meth:`Client.watch`), so nothing is lost or seen twice;
  it leaves a member that lost its raft leader or its link;
- every change of one revision (a txn, the keys of a lease that ended) is
  applied at once: a read never shows half of it;
- a watch whose revision was compacted, or that no endpoint could serve for
  the client's timeout, is replaced by a full read and a new watch; until it
  is back, every read is a full read (the loop polls, as it did before), and
  a read that fails says why;
- every ``resync_interval`` a full read and a new watch, a safety net;
  every ``timeout`` of the client while the watch is not on its first
  endpoint (the agent's own member, which then serves its reads and does
  not wait for a foreign watch when it is stopped);
- the loop never decides on a view older than its own writes: ``at_least``
  (the revision of its client's last change) is waited for, briefly, and
  read at once if the watch does not bring it.

Only ``hosts/`` and ``services/`` are watched: ``history/``, which grows
with every takeover, sorts before them and is left out.
"""

import contextlib
import logging
import threading
import time

from slaposha import intents
from slaposha.cluster.etcd import EtcdError, KeyValue, WatchCanceled
from slaposha.cluster.lease import alive_hosts

__all__ = ['ClusterWatch']

logger = logging.getLogger(__name__)


class ClusterWatch(object):
    """The hosts and services keys of one cluster, kept by a watch.

    ``client``: an etcd Client of its own (a watch holds a connection);
    its ``timeout`` bounds a full read and how long the watch may find no
    endpoint before reads fall back to full reads. ``on_change()`` is
    called, in the watch's thread, after each change is applied and when
    the watch breaks or comes back.
    """

    def __init__(self, client, keys, resync_interval, on_change=None):
        self.client = client
        self.keys = keys
        self.resync_interval = resync_interval
        self.on_change = on_change
        # hosts/ and services/ and nothing between them ('services/' + 1).
        self.first_key = keys.hosts
        self.range_end = keys.services[:-1] + chr(ord('/') + 1)
        self.revision = 0          # every change up to it is in the cache
        self.problem = 'not read from etcd yet'
        self.reloads = 0           # full reads, for the tests and benchmarks
        self._kvs = {}
        self._derived = None       # (revision, views, alive)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name='etcd-watch',
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """End the watch (its connection closed at once) and the thread."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self.client.close()

    # -- reading --------------------------------------------------------------

    def read(self, at_least=0, catch_up=None):
        """({service: intents.View}, {host: health}) as of the newest
        revision the cache holds, which is ``at_least`` or newer: that one
        is waited for up to ``catch_up`` seconds (default: the client's
        request timeout), then read from etcd. While the watch is broken
        every read is a full read. Raises EtcdError when etcd cannot be
        read."""
        if catch_up is None:
            catch_up = self.client.request_timeout
        with self._cond:
            if self.revision < at_least and not self.problem:
                self._cond.wait_for(lambda: self.revision >= at_least or
                                    self.problem or self._stop.is_set(),
                                    catch_up)
            behind = self.revision < at_least
            broken = self.problem
        if behind and not broken:
            logger.info('etcd watch: revision %d not seen %.2f s after our'
                        ' write of it (the cache is at %d): reading the'
                        ' cluster', at_least, catch_up, self.revision)
        if behind or broken:
            self.reload()
        return self._snapshot()

    def reload(self):
        """Read every watched key (linearizable) and replace the cache with
        it unless the watch already brought newer; returns the revision
        read. Raises EtcdError."""
        result = self.client.range(self.first_key, range_end=self.range_end,
                                   timeout=self.client.timeout)
        with self._cond:
            self.reloads += 1
            if result.revision >= self.revision:
                self._kvs = {kv.key: kv for kv in result.kvs}
                self.revision = result.revision
                self._derived = None
                self._cond.notify_all()
        return result.revision

    def _snapshot(self):
        with self._cond:
            derived = self._derived
            if derived is None or derived[0] != self.revision:
                kvs = sorted(self._kvs.values())
                derived = self._derived = (
                    self.revision, intents.views(kvs, self.keys),
                    alive_hosts(kvs, self.keys))
        # The caller may add to them: copies, not the cache's own.
        return dict(derived[1]), dict(derived[2])

    # -- following --------------------------------------------------------------

    def _apply(self, events):
        changed = False
        with self._cond:
            known = self.revision
            for event in events:
                if event.mod_revision <= known:
                    continue  # a full read already has it
                if event.type == 'DELETE':
                    self._kvs.pop(event.key, None)
                else:
                    self._kvs[event.key] = KeyValue(*event[1:])
                self.revision = event.mod_revision
                changed = True
            if changed:
                self._derived = None
                self._cond.notify_all()
        if changed:
            self._changed()

    def _set_problem(self, problem):
        with self._cond:
            if problem == self.problem:
                return
            self.problem = problem
            self._cond.notify_all()
        if problem:
            logger.warning('etcd watch: %s', problem)
        else:
            logger.info('etcd watch: following the cluster from revision %d',
                        self.revision)
        self._changed()

    def _changed(self):
        if self.on_change is not None:
            self.on_change()

    def _run(self):
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception as e:  # a bug here must not freeze the view
                logger.exception('etcd watch failed')
                self._set_problem('watch: %s' % e)
                self._stop.wait(self.client.retry_interval)

    def _follow(self):
        start = None  # revision to watch from; None: read everything first
        while not self._stop.is_set():
            if start is None:
                # Back to the first endpoint (the agent's own member) if
                # another one served the last span: a member being stopped
                # waits for the watches open on it.
                self.client.prefer_first()
                try:
                    start = self.reload() + 1
                except EtcdError as e:
                    self._set_problem('cannot read the cluster: %s' % e)
                    self._stop.wait(self.client.retry_interval)
                    continue
                self._set_problem(None)
                # On another member than the first, only until the first
                # can be tried again: the first one is the agent's own.
                span = self.resync_interval if self.client.endpoint == \
                    self.client.endpoints[0] else self.client.timeout
                resync_at = time.monotonic() + span
            try:
                watch = self.client.watch(
                    self.first_key, range_end=self.range_end,
                    start_revision=start, batches=True,
                    timeout=max(0.01, resync_at - time.monotonic()),
                    patience=self.client.timeout)
                with contextlib.closing(watch):
                    for events in watch:
                        self._apply(events)
                        start = events[-1].mod_revision + 1
                        if self._stop.is_set():
                            return
            except WatchCanceled as e:
                logger.info('etcd watch: %s; reading the cluster again', e)
            except EtcdError as e:
                self._set_problem('watch: %s' % e)
            start = None  # span over (the safety net), or broken: read all
