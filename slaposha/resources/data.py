"""What the data drivers (``btrfs``, ``rsync``) share: their contract with
the agent (:class:`DataResource`), what the agent gives them on the owner
(``configure``: the fencing token, the standbys, the TLS files;
``peer_lost``: whether a standby is lost), the checks before a start, the
schedule of their background cycles and the problems they log once."""

import logging
import time

from slaposha.schema import Key
from slaposha.replication import Peer, ReplicationError
from slaposha.resources import UP, WARN, Resource, ResourceError, Status
from slaposha.units import human_seconds

__all__ = ['DataResource', 'DIVERGED_KEYS']

# The retention of diverged copies, the same for every data driver.
DIVERGED_KEYS = (
    Key('diverged_keep', 'integer', 3, 'diverged copies (data an old owner'
        ' wrote that the new owner\'s copy lacks, kept aside) kept on each'
        ' host, newest first; older ones are deleted', minimum=1),
    Key('diverged_max_age', 'duration', None, 'diverged copies older than'
        ' this are deleted, except the newest one (none: kept whatever'
        ' their age)'),
)


class DataResource(Resource):
    """Base of a driver whose data the owner sends to the standbys every
    ``interval`` (its ``port``: the standbys' receivers). What the agent
    does with it (the data drivers' contract):

    1. **On every host**, one receiver per port for the data of the
       services that may run there, started with the agent and kept
       running whether the host owns them or not (:mod:`slaposha.daemon`);
       :meth:`receiver` says what it serves of this resource. It is a
       :class:`slaposha.replication.receiver.Receiver` (serving rsync trees
       too, through its :class:`~slaposha.replication.receiver.TreeReceiver`)::

           receiver = Receiver(address, port, tls, volumes,
                               hosts=cluster.cluster.hosts,
                               handlers=TreeReceiver(trees).handlers).start()
           ...
           receiver.stop()

       ``address``: the host's address; ``port``: the resources' ``port``
       (1216 by default); ``tls``: ``cluster.tls_files(host)`` = (ca,
       cert, key), required (``crl.pem`` beside ``ca.crt`` is honoured);
       ``hosts``: the only senders served (host certificates only, in any
       case). (Or as a process: ``python -m slaposha.replication receiver
       --host H --listen A --ssl-dir D VOLUME...``.) A receiver refuses
       streams of an epoch older than the newest it has seen, and streams
       into data whose service runs here.

    2. **On the owner, before** ``start()``: ``configure(token, peers,
       tls, host)``: the owner key's fencing token, the standbys as
       ``{name: (address, port)}`` (or ``{name: address}``: the ``port``
       key), the TLS files, this host's name. Called again when the peers
       change; a new token needs a stop and a start. ``peer_lost``, set by
       the agent, tells whether a standby is known lost.

    3. From ``start()`` to ``stop()`` (or ``fence()``), replication runs in
       threads of its own (btrfs: one takes the snapshots, one per standby
       sends them; rsync: a cycle when ``tick`` finds one due), whatever
       the agent's loop does.

    4. **On standbys**, for the status tree and the takeover decision:
       ``standby_status()`` (how old this host's copy is, whether a
       diverged copy was kept aside), ``lag()`` (seconds, snapshot),
       ``exists()`` and ``path`` (whether the data itself is here, and
       where), ``diverged_copies()`` (what is kept aside here).

    ``start`` refuses (names the newer token) when this host's copy was
    written by a newer owner than ``token``: the agent's token is stale.
    ``stop`` sends a last copy when the standbys answer, within
    ``stop_timeout``, cut as soon as every standby still being sent to is
    known lost (``peer_lost``: its host holds no lease);
    ``handover_problem(name)`` says then why a standby did not get it.
    ``status`` is ``up`` with the standbys' lag and the last cycle, ``warn``
    when a standby did not get the last copy, or its copy is older than
    ``max_lag``.
    """

    def __init__(self, section, context):
        super().__init__(section, context)
        self.token = None
        self.peers = []
        self.tls = None
        self.host = None
        # Set by the agent: peer_lost(name) is true once a standby is known
        # lost (its host holds no lease): a last copy still going to it is
        # cut then, not at stop_timeout.
        self.peer_lost = None
        # After a stop that sent a last copy: {standby: its Transfer, its
        # ReplicationError, or None when it had no answer in time}.
        self.handover = None
        self.running = False
        self.failure = None       # why the last cycle could not even begin
        self._thread = None
        self._next = 0.0
        self._said = {}           # the last problem logged, said once

    def configure(self, token, peers, tls, host):
        """The owner's fencing ``token``, the standbys ``{name: (address,
        port)}`` or ``{name: address}``, this host's TLS files (ca, cert,
        key) and name. Before start; again when the peers change."""
        listed = []
        for name, where in sorted(peers.items()):
            if isinstance(where, str):
                where = (where, self.conf.port)
            listed.append(Peer(name, where[0], int(where[1])))
        self.token, self.peers, self.tls, self.host = \
            int(token), listed, tuple(tls) if tls else None, host

    def receiver(self):
        """What this host's receiver serves of this resource: (port,
        volumes, trees) (:mod:`slaposha.replication`'s objects)."""
        raise NotImplementedError

    @property
    def path(self):
        """Where the data lives, on every host."""
        return self.volume.path

    def exists(self):
        """Whether the data itself (not a copy of it) is on this host."""
        return self.volume.exists()

    def lost(self, name):
        """Whether standby ``name`` is known lost (``peer_lost``); False
        when that cannot be told: a last copy to it then waits for
        stop_timeout, as it would without the agent's word."""
        if self.peer_lost is None:
            return False
        try:
            return bool(self.peer_lost(name))
        except Exception:
            logging.getLogger(type(self).__module__).exception(
                '%s: cannot tell whether %s is lost', self.rid, name)
            return False

    def handover_problem(self, name):
        """After ``stop``: why standby ``name`` did not get the last copy
        (one line), or None when it did, or when there was none to send."""
        if not self.handover or name not in self.handover:
            return None
        got = self.handover[name]
        if got is None:
            return 'no last copy within stop_timeout (%s)' % human_seconds(
                self.conf.stop_timeout)
        if isinstance(got, ReplicationError):
            return got.message
        return None

    def _check_configured(self):
        """Before a start: the agent gave the token and the TLS files."""
        if self.token is None or self.host is None:
            raise ResourceError('%s: no fencing token: the agent calls'
                                ' configure(token, peers, tls, host) before'
                                ' start' % self.rid)
        if not self.tls:
            raise ResourceError('%s: replication needs the cluster\'s TLS'
                                ' certificates ([cluster] tls = true)'
                                % self.rid)

    def _cycle_due(self):
        """Whether the next cycle may begin now: running, none going on,
        ``interval`` since the last began (a long one is followed at once).
        Schedules the one after."""
        if not self.running or (self._thread is not None and
                                self._thread.is_alive()):
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.conf.interval
        return True

    def _say(self, problem, about=None):
        """Log a problem once, not every cycle, and its end; each
        ``about`` (a standby, a step) on its own."""
        if problem != self._said.get(about):
            # Under the driver's own logger (slaposha.resources.btrfs...).
            log = logging.getLogger(type(self).__module__)
            if problem:
                log.warning('%s: %s', self.rid, problem)
            elif self._said.get(about):
                log.info('%s: replicating again%s', self.rid,
                         ' (%s)' % about if about else '')
            self._said[about] = problem

    # -- diverged copies ------------------------------------------------------

    def diverged_copies(self):
        """The diverged copies kept on this host (see
        :mod:`slaposha.replication.diverged`), the retention applied first:
        [{id, path, at, reason, token, size}], oldest first."""
        dropped = self.volume.retain_diverged(self.conf.diverged_keep,
                                              self.conf.diverged_max_age)
        for copy_id in dropped:
            logging.getLogger(type(self).__module__).info(
                '%s: diverged copy %s deleted (diverged_keep %d, '
                'diverged_max_age %s)', self.rid, copy_id,
                self.conf.diverged_keep, human_seconds(
                    self.conf.diverged_max_age)
                if self.conf.diverged_max_age is not None else 'none')
        return self.volume.diverged()

    def drop_diverged(self, copy_id):
        """Delete this host's diverged copy ``copy_id``; its entry.
        ReplicationError (one line) when there is none such."""
        return self.volume.drop_diverged(copy_id)

    def _copy_status(self, label, lag, diverged, missing=None, notes=()):
        """A standby's copy ``label`` as a Status: ``missing`` (the text)
        when it has none, else its age ``lag`` against ``max_lag``; then
        ``notes`` and the diverged copies kept aside here."""
        if missing:
            state, text = WARN, missing
        elif lag is None:
            state, text = UP, '%s (age unknown)' % label
        elif self.conf.max_lag is not None and lag > self.conf.max_lag:
            state, text = WARN, '%s is %s old (max_lag %s)' % (
                label, human_seconds(lag), human_seconds(self.conf.max_lag))
        else:
            state, text = UP, '%s is %s old' % (label, human_seconds(lag))
        for note in notes:
            text += '; ' + note
        if diverged:
            state = WARN
            text += '; diverged: %d cop%s kept aside (%s)' % (
                len(diverged), 'y' if len(diverged) == 1 else 'ies',
                ', '.join(d.get('id') or d['path'] for d in diverged))
        return Status(state, text)
