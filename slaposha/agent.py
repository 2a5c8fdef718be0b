"""The agent: the daemon on every host that turns ownership into services.

Each cycle reads the world (hosts and services, followed by an etcd watch:
:mod:`slaposha.cluster.watch`), decides for each service, acts, and says
why in one log line per decision, as Patroni's HA loop does. A change in
etcd starts a cycle at once; at rest the loop sleeps until its next timed
check (``[agent] loop_interval`` while it must look often). The lease is
renewed in a thread of its own (:class:`~slaposha.cluster.lease.HostLease`);
when a renewal is late, that thread suspends the services (frozen, their
addresses dropped) and resumes them if the lease is renewed before its kill
deadline; when it is lost, that thread fences at once (kills the services'
cgroups) and the next cycle cleans up. A separate watchdog process fences
too if the agent itself is frozen.

A service runs only where its owner key is held (DESIGN.md 2). Operators
steer it with intents stored beside the owner key (:mod:`slaposha.intents`):
frozen, a target state, a planned switch. For each service, each cycle:

- owned here: unless frozen, stop it if an operator asked (stop, or switch
  to another host), else start it if it is not running, else check it every
  ``monitor_interval`` and restart a failed resource in place up to
  ``restart`` times before applying ``on_failure``;
- owned elsewhere: make sure it is not running here;
- free: with ``orchestrate = ha`` (or an operator's start), the chosen host
  (switch target, else the most preferred live eligible host) takes the
  owner key and starts it; the others wait.

When the agent refuses to act (frozen, no quorum, a stop that failed), the
decision says which and why, and ``slaposha status`` shows it.

An agent that cannot run services here (not root, e.g. in a SlapOS
partition, or no cgroup of its own) still serves its API and status and
keeps its etcd member, but never takes an owner key: a service must not be
owned by a host that could neither run nor fence it. It says so in one
line, in its log and status (``cannot_run``).
"""

import collections
import datetime
import json
import logging
import math
import os
import threading
import time

from slaposha import history, intents, placement
from slaposha.actions import Actions
from slaposha.backup import BackupError
from slaposha.cgroup import Cgroup, CgroupError, own_cgroup
from slaposha.cluster.etcd import Compare, EtcdError, LeaseNotFound, Op
from slaposha.cluster.keys import Keys
from slaposha.cluster.lease import LOST, SUSPENDED, HostLease, Ownership
from slaposha.config import load_services
from slaposha.metrics import Metrics
from slaposha.replication.diverged import copy_id
from slaposha.resources import DOWN, NA
from slaposha.service import Service, ServiceError
from slaposha.slot import (
    RUNNING, STARTING, STOP_FAILED, STOPPED, STOPPING, ServiceSlot)
from slaposha.status import Status

__all__ = ['Agent']

logger = logging.getLogger('slaposha.agent')

# Decisions kept for the API's decision log.
DECISIONS_KEPT = 500

# Seconds raft must have kept its term before an owner moves the leader.
LEADER_SETTLE = 10.0

# Seconds the agent's shutdown waits for a service's stop to end beyond
# its stop_timeout (the fence of what overran it, and its end).
SHUTDOWN_MARGIN = 10.0


def _changes(old, new):
    """'slapos#node: partitions, software_releases': what changed between
    two publications of the resources' facts."""
    parts = []
    for rid in sorted(set(old) | set(new)):
        a, b = old.get(rid) or {}, new.get(rid) or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            parts.append('%s: %s' % (rid, ', '.join(keys)))
    return '; '.join(parts)


class Agent(Status, Actions):
    """The decision engine of one host (see above); its status is
    :mod:`slaposha.status`, its operators' actions :mod:`slaposha.actions`,
    what it talks through :mod:`slaposha.daemon`."""

    def __init__(self, cluster, host, client, lease_client, action_client,
                 membership, world, etcd_view, tls=None, services=None):
        """The etcd clients, the membership, the watch and the members'
        view come from the daemon (:mod:`slaposha.daemon`), which also
        gives the member and the watchdog once it started them."""
        self.cluster = cluster
        self.host = host
        self.keys = Keys(cluster.etcd.prefix, cluster.name)
        self.tls = tls
        self.client = client
        self.lease_client = lease_client
        self.action_client = action_client
        self.membership = membership
        self._wake = threading.Event()
        self.world = world
        self.member = None
        self.lease = None
        self.watchdog = None
        self.etcd_problem = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._fence_targets = ([], [])
        self._announced = None
        self.started = time.monotonic()
        self._next_leader_check = 0.0
        self._raft_term = None
        self._term_seen = 0.0
        self._renewals = 0
        self.cannot_run = None     # why this host may run no service
        run_dir = cluster.cluster.run_dir
        self.status_path = os.path.join(run_dir, 'agent.json')
        self.socket_path = os.path.join(run_dir, 'agent.sock')
        self.log_dir = os.path.join(cluster.cluster.state_dir, 'log')
        self.cgroup_root = Cgroup(os.path.join(own_cgroup(), 'slaposha'))
        # Service files that do not load: the others run (one broken file
        # degrades this host, it does not keep the agent down); each is
        # said in the log and the status, and this host is not eligible
        # for it.
        self.broken = {}
        confs = services if services is not None else load_services(
            cluster, self.broken)
        for name, why in sorted(self.broken.items()):
            logger.error('service %s is not run here: %s', name, why)
        self.confs = {conf.name: conf for conf in confs}
        self.slots = {}
        for conf in confs:
            if self.host not in conf.service.hosts:
                continue
            svc = Service(conf, self.cgroup_root, self.log_dir)
            self.slots[conf.name] = ServiceSlot(
                svc, Ownership(self.client, self.keys, conf.name, self.host,
                               placement.claims(self.keys, conf, self.host)),
                on_end=self.wake)
        self.owners = {}           # {service: owner host}, as last read
        # Every decision, for the API's decision log (bounded).
        self.decision_log = collections.deque(maxlen=DECISIONS_KEPT)
        self.decisions = 0         # made since the agent began
        self.metrics = Metrics()
        self.etcd_view = etcd_view

    # -- decisions ----------------------------------------------------------

    def decide(self, slot, action, reason, once=False):
        """Record and log one decision: what the agent does and why. With
        ``once``, a decision equal to the last one is not logged again."""
        if once and slot.decision and slot.decision[1:] == (action, reason):
            return
        slot.decision = (time.time(), action, reason)
        self.decisions += 1
        self.decision_log.append({'service': slot.service.name,
                                  'time': slot.decision[0], 'action': action,
                                  'reason': reason})
        self.metrics.decided(slot.service.name, action)
        logger.info('service %s: %s: %s', slot.service.name, action, reason)

    # -- life cycle -----------------------------------------------------------

    def prepare(self):
        """Before the receivers, the member and the watch start: whether
        this host may run services, and the fence of what a previous agent
        left."""
        self.cannot_run = self._cannot_run()
        if self.cannot_run:
            logger.warning('agent %s %s', self.host, self.cannot_run)
        # Nothing can legitimately run before we hold a lease: what a
        # previous agent left (processes, addresses, mounts) is fenced.
        for slot in self.slots.values():
            left = [rid for rid, st in slot.service.status()
                    if st.state not in (DOWN, NA)]
            if left or (slot.service.cgroup.exists() and
                        slot.service.cgroup.pids()):
                slot.service.fence()
                self.decide(slot, 'fence', 'left by a previous agent (%s),'
                            ' before any lease is held'
                            % (' '.join(left) or 'processes'))

    def begin(self):
        """Everything it talks through runs: the startup grace begins."""
        self.started = time.monotonic()

    def _cannot_run(self):
        """Why this agent may run no service here, or None. Services need
        root: their cgroups (the fence), addresses and mounts."""
        uid = os.geteuid()
        if uid != 0:
            return ('runs as uid %d, not root: cannot run services that need'
                    ' root (cgroups, addresses, mounts); serves its API and'
                    ' status only' % uid)
        try:
            self.cgroup_root.create()
        except CgroupError as e:
            return 'cannot run services: %s' % e
        return None

    def loop(self):
        """The decision loop, until stop()."""
        while not self._stop.is_set():
            # Cleared before the cycle: a change during it runs another.
            self._wake.clear()
            decided = self.decisions
            try:
                self.tick()
            except Exception:  # one bad cycle must not end the agent
                logger.exception('cycle failed')
            self.write_status()
            # A decision changes what the next cycle sees here (a
            # service stopped, a start failed): look again soon.
            busy = self.decisions != decided
            self._wake.wait(self.cluster.agent.loop_interval if busy
                            else self._next_cycle())

    def _next_cycle(self):
        """Seconds the loop may sleep when etcd shows no change: a change
        (or a lost lease, or stop) wakes it sooner. ``loop_interval`` while
        something needs the loop often: no lease yet, etcd out of reach, a
        service here with work on a schedule (replication, tasks); else
        until the first timed duty: a monitor or eligibility check, the
        end of a failure hold, of the startup grace or of a switch."""
        interval = self.cluster.agent.loop_interval
        if self.lease is None or not self.lease.valid or self.etcd_problem \
                or self.world.problem:
            return interval
        now, wall = time.monotonic(), time.time()
        due = [self._next_leader_check if self._owns_any() else None,
               now + self.cluster.agent.monitor_interval]
        for slot in self.slots.values():
            if slot.state == RUNNING and slot.service.ticks():
                return interval
            due.append(slot.next_check if slot.token else
                       slot.next_eligibility)
            if slot.failed_until > now:
                due.append(slot.failed_until)
            if not slot.seen_owner:
                due.append(self.started + self.cluster.agent.startup_grace)
            switch = slot.view and slot.view.switch
            if switch and isinstance(switch.get('at'), (int, float)):
                due.append(now + switch['at'] + slot.conf.stop_timeout +
                           slot.conf.start_timeout - wall)
        due = min(t for t in due if t is not None and t > now)
        return max(interval, due - now)

    def _owns_any(self):
        return any(slot.token for slot in self.slots.values())

    def copy_received(self, path):
        """A receiver's thread: a complete copy landed in ``path``. A
        standby that its data made ineligible checks again in the next
        cycle, not monitor_interval later: status, etcd and a switch see it
        eligible as soon as it holds a copy."""
        waiting = [slot for slot in self.slots.values()
                   if slot.waits_for_copy]
        for slot in waiting:
            slot.next_eligibility = 0.0
        if waiting:
            self.wake()

    def wake(self):
        """Run a cycle now: for whatever changes what it would decide."""
        self._wake.set()

    def stop(self):
        self._stop.set()
        self.wake()

    def halt(self):
        """No start that ends from now on is carried on: the agent stops."""
        self._stop.set()

    def stop_services(self):
        """At shutdown: stop the services here and hand ownership back."""
        for slot in self.slots.values():
            if slot.worker is not None and slot.state == STARTING:
                # Not left to its start_timeout: the agent stops now.
                self.decide(slot, 'stop', 'the agent is shutting down: its'
                            ' %s is cancelled' % slot.worker.what)
                with self._lock:
                    slot.service.fence()
            self._wait_worker(slot)  # a cancelled start: stopped after it
            if slot.worker is None and (slot.state != STOPPED or
                                        slot.token):
                self.decide(slot, 'stop', 'the agent is shutting down')
                if slot.suspended is not None:
                    with self._lock:  # frozen: a stop would wait for it
                        slot.service.fence()
                self._stop_service(slot, release=True)
            self._wait_worker(slot)
        if self.lease is not None:
            self.lease.revoke()

    def _wait_worker(self, slot):
        """At shutdown: the service's start or stop ended, and the loop's
        part after it done; one still going on after stop_timeout and a
        margin is fenced (the lease is given back next)."""
        if slot.worker is not None:
            slot.worker.thread.join(slot.conf.stop_timeout + SHUTDOWN_MARGIN)
            if slot.worker.alive():
                self.decide(slot, 'fence', 'the agent is shutting down and'
                            ' its %s still goes on' % slot.worker.what)
                with self._lock:
                    slot.service.fence()
            slot.carry_on()

    # -- replicated data ---------------------------------------------------------

    def _configure_replication(self, slot):
        """Tell the data resources the owner's token and its standbys."""
        peers = {h: self.cluster.hosts[h].address for h in slot.conf.hosts
                 if h != self.host}
        slot.service.configure(slot.token, peers, self.tls, self.host)
        for res in slot.service.data():
            res.peer_lost = self._peer_lost

    def _peer_lost(self, host):
        """Whether ``host`` is known lost: the watch holds no lease of it.
        False while the watch cannot tell (broken, or etcd unreadable):
        then a hand-over waits for its deadline, as before."""
        if self.world.problem:
            return False
        try:
            views, alive = self.world.read(catch_up=0)
        except EtcdError:
            return False
        return host not in alive

    def _data_problems(self, slot, owner_alive):
        """Why this standby's data forbids it to take over by itself:

        - it has no copy at all (neither the live data nor a complete
          copy) while an owner was seen with the data: taking over would
          start the service on empty data, whatever the timings;
        - with ``[service] max_lag``, its copy is older than that, or it
          has none: only the data itself, never copied (a first start),
          may start without one, before any owner was seen. The lag
          that counts is the one measured while the owner was alive: after
          its loss the copy cannot get fresher, and a short outage must not
          make it ineligible.

        ``slaposha takeover --force`` overrides both."""
        max_lag = slot.conf.max_lag
        if owner_alive:
            slot.owner_had_data = True
        problems = []
        for res in slot.service.data():
            if owner_alive or res.rid not in slot.lags:
                seconds, snapshot = res.lag()
                slot.lags[res.rid] = seconds
            seconds = slot.lags[res.rid]
            if seconds is None and res.exists():
                # The data itself, never a copy: a first start may use it;
                # once an owner ran the service elsewhere, its age is
                # unknown, which max_lag does not allow.
                if max_lag is not None and slot.owner_had_data:
                    problems.append('%s: %s here is no copy of the owner\'s'
                                    ' data: its age is unknown (max_lag'
                                    ' %gs); `slaposha takeover --force`'
                                    ' overrides' % (res.rid, res.path,
                                                    max_lag))
            elif seconds is None:
                if max_lag is not None or slot.owner_had_data:
                    problems.append('%s: no copy of %s here yet; `slaposha'
                                    ' takeover --force` overrides' % (
                                        res.rid, res.path))
            elif max_lag is not None and seconds > max_lag:
                problems.append('%s: data too stale: the copy of %s here was'
                                ' %.1f s old (max_lag %gs); `slaposha takeover'
                                ' --force` overrides' % (
                                    res.rid, res.path, seconds,
                                    max_lag))
        return problems

    # -- the lease ------------------------------------------------------------

    def _grant(self):
        if self.lease is not None:
            # The lease given up (its deadline passed, the services were
            # fenced) is never renewed again, whatever answer comes late:
            # else its owner keys would outlive the fence.
            self.lease.stop()
        try:
            lease = HostLease(
                self.lease_client, self.cluster.lease.ttl,
                self.cluster.lease.renew_interval,
                self.cluster.lease.retry_interval,
                self.cluster.lease.request_timeout,
                self.cluster.lease.fence_margin,
                on_renewed=self._on_renewed, on_lost=self._on_lost,
                kill_margin=self.cluster.lease.kill_margin,
                on_suspended=self._on_suspended,
                on_resumed=self._on_resumed)
            lease.grant()
        except EtcdError as e:
            self._etcd_down('cannot get a lease: %s' % e)
            return False
        self.lease = lease
        self._announced = None
        self._renewals = 0
        logger.info('lease %x granted (ttl %ss)', lease.id, lease.ttl)
        return True

    def _on_renewed(self, kill_deadline):
        lease = self.lease
        if lease is not None and lease.state() != LOST and \
                lease.renewals > self._renewals:
            self._renewals = lease.renewals
            self.metrics.renewed(lease.latency)
        # An agent that is stuck cannot suspend its services at the
        # deadline: the watchdog kills them halfway between it and the
        # kill deadline, keeping most of fence_margin for the kill (the
        # agent's own suspension, at the deadline, comes first and arms it
        # with the kill deadline: it is alive).
        lease_conf = self.cluster.lease
        self._arm_watchdog(kill_deadline - max(
            0.0, lease_conf.fence_margin - lease_conf.kill_margin) / 2)

    def _arm_watchdog(self, deadline):
        cgroups, addresses = self._fence_targets
        if self.watchdog is not None:
            self.watchdog.arm(deadline, cgroups, addresses)

    def _on_suspended(self, reason):
        # In the renewal thread, at the deadline: a running service is
        # frozen, its addresses dropped, its data kept; one starting or
        # stopping is killed, as at a lost lease.
        with self._lock:
            for slot in self.slots.values():
                if slot.fenced or slot.suspended is not None:
                    continue
                if slot.state == RUNNING and slot.token and \
                        slot.worker is None:
                    slot.suspended = time.monotonic()
                    fenced = slot.service.suspend()
                    self.decide(slot, 'suspend', '%s: processes frozen,'
                                ' addresses dropped, data kept%s' % (
                                    reason, '; ' + '; '.join(fenced)
                                    if fenced else ''))
                elif slot.state != STOPPED or slot.token:
                    slot.service.fence()
                    slot.fenced = True
                    logger.warning('service %s: fence: %s (it was not'
                                   ' running)', slot.service.name, reason)
            # Frozen, addresses gone: the watchdog kills them at the kill
            # deadline if no renewal resumes them (or if the agent sticks).
            lease = self.lease
            if lease is not None and lease.kill_deadline is not None:
                self._arm_watchdog(lease.kill_deadline)
        self.write_status()  # the loop may be waiting for etcd meanwhile

    def _on_resumed(self, late):
        # In the renewal thread: etcd renewed the same lease, so it never
        # expired and the owner keys on it stayed ours.
        with self._lock:
            for slot in self.slots.values():
                if slot.suspended is None:
                    continue
                problems = slot.service.resume()
                self.decide(slot, 'resume', 'lease renewed %.1f s after its'
                            ' deadline (it never expired): resumed, same'
                            ' processes, token %s%s' % (
                                late, slot.token, '; ' + '; '.join(problems)
                                if problems else ''))
                slot.suspended = None
        self.write_status()
        self.wake()

    def _on_lost(self, reason):
        # Runs in the renewal thread, at the deadline at the latest: kill
        # first, clean up in the next cycle. Frozen or not: safety first.
        with self._lock:
            for slot in self.slots.values():
                if slot.state != STOPPED or slot.token:
                    slot.service.fence()
                    slot.fenced = True
                    logger.warning('service %s: fence: lease lost: %s',
                                   slot.service.name, reason)
        self.wake()  # the next cycle cleans up and asks a new lease

    def _update_fence_targets(self):
        cgroups, addresses = [], []
        for slot in self.slots.values():
            if slot.token or slot.state != STOPPED:
                c, a = slot.service.fence_targets()
                cgroups += c
                addresses += a
        if (cgroups, addresses) == self._fence_targets:
            return
        self._fence_targets = (cgroups, addresses)
        lease = self.lease
        if lease is not None and lease.valid:
            self._on_renewed(lease.kill_deadline)
        elif lease is not None and lease.state() == SUSPENDED:
            self._arm_watchdog(lease.kill_deadline)

    def _etcd_down(self, problem):
        if problem != self.etcd_problem:
            logger.warning('etcd: %s', problem)
        self.etcd_problem = problem

    # -- one cycle ------------------------------------------------------------

    def tick(self):
        state = self.lease.state() if self.lease is not None else LOST
        if state == SUSPENDED:
            return  # the lease thread resumes the services or kills them
        if state == LOST:
            self._after_lease_loss()
            if not self._grant():
                return
        self._after_suspension()
        try:
            # Never older than what this loop itself wrote.
            views, alive = self.world.read(at_least=self.client.last_change)
        except EtcdError as e:
            # Keep what runs: the lease thread fences at the deadline if
            # etcd stays out of reach.
            self._etcd_down('cannot read the cluster: %s' % e)
            return
        self.etcd_problem = None
        self.owners = {n: v.owner.value for n, v in views.items() if v.owner}
        # We hold a lease: we are alive, announced or not yet.
        alive.setdefault(self.host, self._health())
        for name, slot in sorted(self.slots.items()):
            try:
                self._decide(slot, views.get(name) or intents.View(name),
                             alive)
            except EtcdError as e:
                self._etcd_down('service %s: %s' % (name, e))
        for name, slot in self.slots.items():
            if slot.state == RUNNING:
                # What each standby reports it has (e.g. software releases).
                slot.service.reported({
                    h: (alive.get(h) or {}).get('reports', {}).get(name)
                    for h in slot.conf.hosts if h != self.host})
                slot.service.tick()
        try:
            self._announce()
        except EtcdError as e:
            self._etcd_down('cannot announce this host: %s' % e)
        self._place_leader(views)

    def _announce(self):
        health = self._health()
        if health != self._announced:
            self.membership.announce(self.lease.id, health)
            self._announced = health

    def _after_suspension(self):
        """A service that was starting or stopping when the lease renewal
        was late was killed, not suspended; the lease held after all: once
        its worker ended, it is cleaned up and its owner key released, for
        the agents to place it again."""
        for slot in self.slots.values():
            if slot.fenced and slot.token and slot.worker is None:
                self.decide(slot, 'stop', 'killed while its lease renewal'
                            ' was late (it was %s); the lease held: owner key'
                            ' released' % slot.state)
                self._stop_service(slot, release=True, lease_lost=True)

    def _after_lease_loss(self):
        for slot in self.slots.values():
            slot.suspended = None
            reason = (self.lease.lost_reason or 'its self-fence deadline'
                      ' passed') if self.lease else 'no lease'
            slot.carry_on()
            if slot.worker is not None:
                # Fenced with the rest: cleaned up once its worker ended
                # (never released: the owner key goes with the lease).
                if slot.token:
                    self.decide(slot, 'stop', 'lease lost (%s): services'
                                ' fenced, cleaning up once its %s ended' % (
                                    reason, slot.worker.what))
                    slot.fenced = True
                    slot.forget_key()
                continue
            if slot.state != STOPPED or slot.token or slot.fenced:
                self.decide(slot, 'stop', 'lease lost (%s): services'
                            ' fenced, cleaning up' % reason)
                with self._lock:
                    slot.service.fence()
                self._stop_service(slot, release=False, lease_lost=True)
                slot.fenced = False

    def _place_leader(self, views):
        """Keep etcd's raft leader off the hosts that own services: when a
        host dies with the leader, etcd first elects another one and then
        extends every lease by an election timeout, which delays the
        takeover (reference/coordination.md A.4)."""
        if self.cluster.etcd.mode != 'embedded' or \
                self.cluster.etcd.leader_placement != 'away':
            return
        now = time.monotonic()
        if now < self._next_leader_check:
            return
        self._next_leader_check = now + self.cluster.agent.monitor_interval
        if not self._owns_any():
            return
        # Moving the leader is itself a short election: never while the
        # lease is short of a fresh renewal or raft has just changed term.
        lease = self.cluster.lease
        if self.lease.time_left() < lease.ttl - lease.fence_margin - \
                lease.renew_interval:
            return
        mine = self.member.client_url
        try:
            status = self.client.status(mine)
            if status.raft_term != self._raft_term:
                self._raft_term = status.raft_term
                self._term_seen = now
            if now - self._term_seen < LEADER_SETTLE or not status.is_leader:
                return
            owning = {v.owner.value for v in views.values() if v.owner}
            ids = {m.name: m.id for m in self.client.members()}
            for name in self.cluster.cluster.witnesses + \
                    self.cluster.cluster.hosts:
                if name == self.host or name in owning or name not in ids:
                    continue
                late = self._owner_not_renewing(views)
                if late:
                    logger.info('etcd: raft leadership stays on %s for now:'
                                ' %s', self.host, late)
                    return
                self.client.move_leader(ids[name], mine)
                logger.info('etcd: moved raft leadership from %s to %s: %s'
                            ' owns services (leader_placement = away)',
                            self.host, name, self.host)
                return
        except EtcdError as e:
            logger.info('etcd: could not move raft leadership: %s', e)

    def _owner_not_renewing(self, views):
        """Why another owner's lease may be running out, or None. A new
        raft leader gives every lease its whole TTL again: moving the
        leadership within a TTL of an owner's crash delays its takeover by
        up to that TTL (benchmarks/RESULTS.md, scale). etcd tells a lease's
        time left in whole seconds, rounded down: one renewed on schedule
        shows ttl - ceil(renew_interval) or more (less only at the instant
        before a renewal, which postpones the move to the next check); one
        whose holder died shows less from ceil(renew_interval) after its
        last renewal on."""
        lease = self.cluster.lease
        floor = lease.ttl - math.ceil(lease.renew_interval)
        others = sorted(set((v.owner.value, v.owner.lease)
                            for v in views.values() if v.owner and
                            v.owner.lease and v.owner.value != self.host))
        for host, lease_id in others:
            try:
                left = self.client.lease_ttl(lease_id)
            except LeaseNotFound:
                return '%s\'s lease just ended' % host
            if left < floor:
                return ('%s\'s lease has %d s left (renewed on schedule: %d'
                        ' or more)' % (host, left, floor))
        return None

    def _chosen_host(self, slot, view, alive):
        """Where a free service should start, with the reason, or
        (None, reason). A valid switch names its host; else the most
        preferred live host that did not just fail it. Just after the agent
        started, a more preferred host that has not joined yet is waited
        for. A host that runs a service excluding this one is never chosen
        (slaposha.placement)."""
        hosts = slot.conf.hosts
        blocked = []

        def free(host):
            why = placement.blocking(self.confs, self.owners, self.confs[
                slot.service.name], host)
            if why:
                blocked.append(why)
            return why is None
        switch = view.switch
        if switch and self._switch_lost(slot, switch, alive):
            switch = None  # given up: back to the preferences
        if switch and switch.get('to') in hosts and switch['to'] in alive \
                and free(switch['to']):
            return switch['to'], 'an operator switched it to %s' % switch['to']
        target = view.target or {}
        if target.get('host') in hosts and target['host'] in alive and \
                free(target['host']):
            return target['host'], 'an operator started it on %s' \
                % target['host']
        if slot.conf.orchestrate != 'ha':
            return None, 'orchestrate = manual: started only by an operator'
        # The grace is for a cluster starting up: once an owner was seen,
        # a lost owner is taken over at once.
        starting = not slot.seen_owner and time.monotonic() - \
            self.started < self.cluster.agent.startup_grace
        for host in hosts:
            health = alive.get(host)
            if health is None:
                if starting:
                    return None, '%s is preferred and has not joined yet' \
                        ' (startup grace %gs)' % (
                            host, self.cluster.agent.startup_grace)
                continue
            if slot.service.name in health.get('failed', ()) or \
                    slot.service.name in health.get('ineligible', {}) or \
                    not free(host):
                continue
            return host, '%s is the preferred live host' % host
        return None, 'no live host can run it%s' % (
            ': ' + '; '.join(dict.fromkeys(blocked)) if blocked else '')

    def _decide(self, slot, view, alive):
        slot.view = view
        owner_kv = view.owner
        slot.owner = owner_kv.value if owner_kv else None
        slot.owner_token = owner_kv.create_revision if owner_kv else None
        if owner_kv is not None:
            slot.last_owner = (owner_kv.value, time.time())
        elif (view.target or {}).get('state') == 'stopped':
            slot.last_owner = None  # stopped: a later start moves nothing
        slot.seen_owner = slot.seen_owner or owner_kv is not None
        slot.carry_on()
        if slot.worker is not None:
            self._while_busy(slot, owner_kv)
            return
        if not slot.token:
            self._check_eligibility(slot, view)
        if slot.token:
            if owner_kv is None or owner_kv.create_revision != slot.token:
                self.decide(slot, 'stop', 'the owner key is no longer ours'
                            ' (now %s)' % (slot.owner or 'free'))
                with self._lock:
                    slot.service.fence()
                self._stop_service(slot, release=False)
                return
            self._owned(slot, view, alive)
            return
        if owner_kv is not None:
            if slot.state != STOPPED:
                # Owned elsewhere and running here: never both, frozen or
                # not.
                self.decide(slot, 'stop', 'it is owned by %s' % slot.owner)
                self._stop_service(slot, release=False)
            elif not slot.decision or slot.decision[1] not in (
                    'failed', 'switch', 'stop', 'fence', 'refuse',
                    'ineligible'):
                self.decide(slot, 'standby', '%s owns it' % slot.owner,
                            once=True)
            return
        # Free.
        if slot.state != STOPPED:
            # Not down here yet (a stop that failed): never started again.
            self.decide(slot, 'stop', 'it is still %s here' % slot.state,
                        once=True)
            self._stop_service(slot, release=False)
            return
        if view.frozen:
            self.decide(slot, 'frozen', 'not started: frozen by %s'
                        % intents.who(view.frozen), once=True)
            return
        if (view.target or {}).get('state') == 'stopped':
            self.decide(slot, 'stopped', 'not started: stopped by %s'
                        % intents.who(view.target), once=True)
            return
        forced = (view.switch or {}).get('to') == self.host and \
            (view.switch or {}).get('force')
        if slot.failed_until > time.monotonic() or \
                (slot.ineligible and not forced) or self.cannot_run:
            return  # the failure stays the decision shown, for its hold
        host, reason = self._chosen_host(slot, view, alive)
        if host != self.host:
            self.decide(slot, 'wait', reason if host is None else
                        'left to %s: %s' % (host, reason), once=True)
            return
        token = slot.ownership.acquire(self.lease.id)
        if token is None:
            self.decide(slot, 'wait', self._refused(slot), once=True)
            return
        slot.token = token
        slot.owner = self.host
        slot.owner_token = token
        switch = view.switch
        abandoned = switch and switch.get('to') not in (None, self.host)
        if abandoned:
            # Chosen instead of the switch's host: the switch is over.
            self._abandon(slot, switch, self._switch_lost(
                slot, switch, alive) or '%s did not take it' % switch['to'])
        self._start_service(slot, 'took the owner key with token %d: %s'
                            % (token, reason), moved=None if abandoned else
                            (view.switch, slot.last_owner))

    def _switch_deadline(self, slot, switch):
        """When a switch must be done (wall clock): the service's
        stop_timeout + start_timeout after it was asked."""
        at = switch.get('at')
        if not isinstance(at, (int, float)):
            return time.time()
        return at + slot.conf.stop_timeout + slot.conf.start_timeout

    def _switch_lost(self, slot, switch, alive):
        """Why a switch that is not done yet will never be, or None: its
        host is gone (no lease) or failed it, or its deadline passed."""
        to = switch.get('to')
        if to is None:
            return 'unreadable'
        health = alive.get(to)
        if health is None:
            return '%s is not alive (no agent holds a lease there)' % to
        if slot.service.name in health.get('failed', ()):
            return '%s failed to start it' % to
        if health.get('cannot_run'):
            return '%s cannot run it' % to
        if time.time() > self._switch_deadline(slot, switch):
            return 'not running on %s within %g s (stop_timeout +' \
                ' start_timeout)' % (to, slot.conf.stop_timeout +
                                     slot.conf.start_timeout)
        return None

    def _abandon(self, slot, switch, reason, outcome='it runs here'):
        """Give up a switch (or an operator's takeover) while we own the
        service: the intent goes and a record of why goes into the history,
        in one transaction under our token, and only if the intent is still
        the one given up (a newer request stays). It never resurfaces."""
        name = slot.service.name
        now = time.time()
        since = switch.get('at') if isinstance(switch.get('at'),
                                               (int, float)) else now
        self.decide(slot, 'abandon', 'the switch to %s asked by %s is'
                    ' abandoned after %.1f s: %s; %s' % (
                        switch.get('to'), intents.who(switch), now - since,
                        reason, outcome))
        key = self.keys.service(name, 'switch')
        entry = {'service': name, 'kind': 'abandoned',
                 'from': self.host, 'to': str(switch.get('to')),
                 'token': slot.token, 'since': since, 'running': now,
                 'duration': round(max(0.0, now - since), 3),
                 'by': switch.get('by'), 'reason': reason}
        try:
            kept = history.record(
                self.client, self.keys, slot.ownership.guard(slot.token),
                entry, self.cluster.agent.history_kept,
                compare=[Compare.value(key, '==', json.dumps(
                    switch, sort_keys=True))], ops=[Op.delete(key)])
        except EtcdError as e:
            logger.warning('service %s: the abandoned switch is not'
                           ' cleared yet: %s', name, e)
            return
        if not kept:
            logger.info('service %s: the switch changed meanwhile (or we'
                        ' no longer own it): left as it is', name)
        slot.view = slot.view._replace(switch=None)

    def _handover_missed(self, slot, switch):
        """Why the switch's target did not get the service's data at this
        stop (the last copy of a data resource), or None."""
        to = switch.get('to')
        for res in slot.service.data():
            why = res.handover_problem(to)
            if why:
                return '%s did not get the last copy of %s: %s' % (
                    to, res.rid, why)
        return None

    # -- a restore of the whole service (an operator's, run by the owner) --------

    def _restore_deadline(self, slot, intent):
        """When a restore must have ended (wall clock): two stops and two
        starts after it was asked, room to undo it."""
        at = intent.get('at')
        if not isinstance(at, (int, float)):
            return time.time()
        return at + 2 * (slot.conf.stop_timeout + slot.conf.start_timeout)

    def _restore_lost(self, slot, view):
        """Why the restore asked will not be run here, or None."""
        intent = view.restore
        if 'unreadable' in intent:
            return intent['unreadable']
        if intent.get('token') != slot.token:
            return ('%s, which was to run it with token %s, no longer owns'
                    ' it: it runs on %s from the copy there' % (
                        intent.get('host'), intent.get('token'), self.host))
        if time.time() > self._restore_deadline(slot, intent):
            return 'not done within %g s (2 x (stop_timeout +' \
                ' start_timeout))' % (2 * (slot.conf.stop_timeout +
                                          slot.conf.start_timeout))
        for field in ('frozen', 'switch'):
            if getattr(view, field):
                return '%s by %s meanwhile' % (
                    'frozen' if field == 'frozen' else 'a switch asked',
                    intents.who(getattr(view, field)))
        if (view.target or {}).get('state') == 'stopped':
            return 'stopped by %s meanwhile' % intents.who(view.target)
        return None

    def _restore(self, slot, intent):
        """Bring the whole service back to a snapshot, in its worker: stop
        it, make the snapshot the live data of each btrfs resource (the data
        before kept aside), start it. Ends done, or undone (the data before
        back, the service started on it again), recorded in the history."""
        from slaposha import backup
        token = slot.token
        deadline = self._restore_deadline(slot, intent)
        point = intent.get('snapshot') or datetime.datetime.fromtimestamp(
            intent.get('when') or 0, datetime.timezone.utc).isoformat()
        chosen = []
        for res in slot.service.data():
            if res.kind != 'btrfs':
                self._end_restore(slot, intent, 'undone', '%s keeps no'
                                  ' snapshots: restore is for btrfs data'
                                  ' only; nothing done' % res.rid)
                return
            try:
                chosen.append((res, backup.choose(res.volume, point)[0]))
            except BackupError as e:
                self._end_restore(slot, intent, 'undone', '%s: %s; nothing'
                                  ' done' % (res.rid, e))
                return
        names = ' '.join(snap.name for res, snap in chosen)
        why = 'restore to %s asked by %s' % (names, intents.who(intent))
        self.decide(slot, 'restore', 'stopping it to bring its data back to'
                    ' %s, as %s asked (deadline in %.0f s)' % (
                        names, intents.who(intent), deadline - time.time()))
        may_go_on = slot.may_go_on(self.lease)
        conf = slot.conf

        def work():
            """(what failed or None, why, [(rid, status) still up], the
            Restored of each volume changed and not put back)."""
            try:
                slot.service.stop(timeout=conf.stop_timeout)
            except ServiceError as e:
                with self._lock:
                    slot.service.fence()
                return 'stop', 'stop failed at %s (%s)' % (e.rid, e), [
                    (rid, st) for rid, st in slot.service.status()
                    if st.state not in (DOWN, NA)], []
            if not may_go_on():
                return 'lease', 'the lease or the owner key was lost', [], []
            if time.time() + conf.stop_timeout + 2 * conf.start_timeout > \
                    deadline:
                return 'late', 'the stop took too long to go on within' \
                    ' the deadline', [], []
            done = []
            for res, snap in chosen:
                try:
                    done.append(backup.restore_live(res.volume, snap, token,
                                                    self.host, why))
                except BackupError as e:
                    return 'data', '%s: %s; %s' % (res.rid, e, self._undo(
                        done, e)), [], []
            try:
                slot.service.start(may_go_on=may_go_on,
                                   timeout=conf.start_timeout)
            except ServiceError as e:
                failed = 'it did not start on the restored data: start' \
                    ' failed at %s: %s' % (e.rid, e)
                return 'start', '%s; %s' % (failed, self._undo(
                    done, failed)), [], []
            return None, None, [], done
        slot.spawn('restore', STARTING, work,
                   lambda worker: self._restored(slot, worker, intent,
                                                  names, token))

    def _undo(self, done, failed):
        """Put back the data before a restore, in each volume changed;
        one line."""
        from slaposha import backup
        notes = []
        for r in reversed(done):
            try:
                logger.info('%s', backup.undo_restore(
                    r, 'restore undone: %s' % failed))
            except BackupError as e:
                notes.append('cannot put the data back: %s' % e)
        return '; '.join(notes) or ('the data before is back' if done
                                    else 'nothing changed')

    def _restored(self, slot, worker, intent, names, token):
        """The loop's part after a restore's worker."""
        from slaposha import backup
        if self._cancelled(slot)[0] is not None or worker.error is not None:
            # Fenced or lost meanwhile (the next owner ends the restore),
            # or a bug: cleaned up as a start that failed.
            self._started(slot, worker, None, what='restore')
            return
        failed, why, left, done = worker.result
        if failed is None:
            self._started(slot, worker, None, what='restore')
            self._end_restore(slot, intent, 'done', '; '.join(
                'back to %s (taken %s UTC), the data before kept aside on %s'
                ' as %s' % (r.snapshot, backup.format_time(r.created),
                            self.host, copy_id(r.aside) if r.aside else '-')
                for r in done), names, token)
            return
        if left:
            rid, st = left[0]
            slot.state = STOP_FAILED
            self.decide(slot, 'refuse', '%s and %s is still %s: not'
                        ' releasing it' % (why, rid, st.state))
            self._check(slot)
            self._update_fence_targets()
        else:
            # The next cycle starts it again, on the data it had.
            slot.state = STOPPED
            slot.resources = []
        self._end_restore(slot, intent, 'undone', why, names, token)

    def _end_restore(self, slot, intent, outcome, reason, snapshot=None,
                     token=None):
        """A restore ends: its intent goes and a record of how goes into
        the history, in one transaction under the owner's token, only if
        the intent is still the one ended."""
        name = slot.service.name
        token = token or slot.token
        now = time.time()
        since = intent.get('at') if isinstance(intent.get('at'),
                                               (int, float)) else now
        self.decide(slot, 'restore', 'the restore to %s asked by %s is %s'
                    ' after %.1f s: %s' % (
                        snapshot or intent.get('point'), intents.who(intent),
                        outcome, now - since, reason))
        if token is None:
            return  # no longer the owner: the next one ends it
        key = self.keys.service(name, 'restore')
        entry = {'service': name, 'kind': 'restore', 'from': self.host,
                 'to': str(snapshot or intent.get('point')), 'token': token,
                 'since': since, 'running': now,
                 'duration': round(max(0.0, now - since), 3),
                 'by': intent.get('by'), 'reason': reason, 'outcome': outcome}
        compare = [] if 'unreadable' in intent else [Compare.value(
            key, '==', json.dumps(intent, sort_keys=True))]
        try:
            if not history.record(
                    self.client, self.keys, slot.ownership.guard(token),
                    entry, self.cluster.agent.history_kept, compare=compare,
                    ops=[Op.delete(key)]):
                logger.info('service %s: the restore changed meanwhile (or'
                            ' we no longer own it): left as it is', name)
        except EtcdError as e:
            logger.warning('service %s: the restore that ended is not'
                           ' cleared yet: %s', name, e)
            return
        if slot.view is not None:
            slot.view = slot.view._replace(restore=None)

    def _refused(self, slot):
        """Why the owner key was not ours to take, as one line."""
        own = slot.ownership
        if own.holder is not None or own.blocker is None:
            return '%s took the owner key first' % (
                own.holder.value if own.holder else 'another host')
        # The claim of this host for an exclusive name is taken.
        name = own.blocker.value
        other = self.slots.get(name)
        view = other.view if other is not None else None
        return placement.refusal(
            self.client, self.keys, self.host, own.blocker,
            lambda n: other is not None and (other.token or
                                             other.state != STOPPED),
            view.owner if view is not None else None)

    def _record_move(self, slot, switch, last_owner):
        """A takeover or a switch ended here: count it and keep it in the
        history (slaposha.history says what the duration covers).
        ``switch`` and ``last_owner``: as they were when the owner key was
        taken."""
        switch = switch or {}
        running = time.time()
        if switch.get('to') == self.host and \
                isinstance(switch.get('at'), (int, float)):
            kind, since, by = 'switch', switch['at'], switch.get('by')
        elif last_owner is not None:
            kind, since, by = 'takeover', last_owner[1], None
        else:
            return  # a first start: nothing moved
        entry = {'service': slot.service.name, 'kind': kind,
                 'from': last_owner[0] if last_owner else None,
                 'to': self.host, 'token': slot.token, 'since': since,
                 'running': running,
                 'duration': round(max(0.0, running - since), 3), 'by': by}
        self.metrics.moved(slot.service.name, kind, entry['duration'])
        logger.info('service %s: %s from %s to %s (token %d) took %.2f s',
                    entry['service'], kind, entry['from'] or '-', self.host,
                    slot.token, entry['duration'])
        # In a thread: the loop has other services to look after.
        threading.Thread(target=self._keep_move, name='history',
                         args=(slot.ownership.guard(slot.token), entry),
                         daemon=True).start()

    def _keep_failure(self, slot, reason, since):
        """A start that failed here, kept in the history as a move is."""
        now = time.time()
        entry = {'service': slot.service.name, 'kind': 'failed',
                 'from': None, 'to': self.host, 'token': slot.token,
                 'since': since, 'running': now,
                 'duration': round(max(0.0, now - since), 3), 'by': None,
                 'reason': reason}
        threading.Thread(target=self._keep_move, name='history',
                         args=(slot.ownership.guard(slot.token), entry),
                         daemon=True).start()

    def _keep_move(self, guard, entry):
        try:
            # Not with the loop's client: history/ is not watched, and the
            # loop waits for the watch to bring its client's writes.
            if not history.record(self.action_client, self.keys, guard,
                                  entry, self.cluster.agent.history_kept):
                logger.warning('service %s: %s not kept in the history:'
                               ' no longer the owner', entry['service'],
                               entry['kind'])
        except EtcdError as e:
            logger.warning('service %s: %s not kept in the history: %s',
                           entry['service'], entry['kind'], e)

    def _check_eligibility(self, slot, view):
        """A standby compares itself with what the owner published (same
        paths, uids, software releases): a host that differs never takes
        the service over, and says why."""
        now = time.monotonic()
        if now < slot.next_eligibility and view.facts == slot.checked_facts:
            return  # checked lately, against these facts
        slot.next_eligibility = now + self.cluster.agent.monitor_interval
        slot.checked_facts = view.facts
        slot.report = slot.service.reports()
        if self.cannot_run:
            problems = [self.cannot_run]
            slot.waits_for_copy = False
        else:
            problems = slot.service.problems(view.facts) if view.facts \
                else []
            data = self._data_problems(slot, view.owner is not None)
            slot.waits_for_copy = bool(data)
            problems += data
        if problems != slot.ineligible:
            slot.ineligible = problems
            if problems:
                self.decide(slot, 'ineligible', 'this host may not take it'
                            ' over: %s%s' % (problems[0], ' (and %d more)'
                                             % (len(problems) - 1)
                                             if len(problems) > 1 else ''))
            else:
                self.decide(slot, 'eligible', 'this host matches the owner'
                            ' and may take it over')

    def _owned(self, slot, view, alive):
        name = slot.service.name
        if view.restore:
            why = self._restore_lost(slot, view)
            if why:
                self._end_restore(slot, view.restore, 'undone', why)
            elif slot.state == RUNNING:
                self._restore(slot, view.restore)
                return
        if view.frozen:
            self.decide(slot, 'frozen', 'left as it is (%s): frozen by %s'
                        % (slot.state, intents.who(view.frozen)), once=True)
            return
        if slot.state == STOP_FAILED:
            self.decide(slot, 'refuse', 'an earlier stop failed (%s): the'
                        ' service stays owned here until it stops; fix it'
                        ' and run `slaposha stop %s`' % (
                            slot.decision[2] if slot.decision else '?', name),
                        once=True)
            if (view.target or {}).get('state') == 'stopped' or (
                    slot.lingering and not slot.service.busy()):
                self._stop_service(slot, release=True)
            return
        if (view.target or {}).get('state') == 'stopped':
            self.decide(slot, 'stop', 'stopped by %s'
                        % intents.who(view.target))
            self._stop_service(slot, release=True)
            return
        switch = view.switch
        if switch and switch.get('to') not in (None, self.host):
            lost = self._switch_lost(slot, switch, alive)
            if lost is None:
                self.decide(slot, 'switch', 'moving it to %s, as %s asked'
                            ' (deadline in %.0f s)' % (
                                switch['to'], intents.who(switch),
                                self._switch_deadline(slot, switch) -
                                time.time()))
                slot.switching = switch
                self._stop_service(slot, release=True)
                return
            self._abandon(slot, switch, lost)
        if slot.state != RUNNING:
            self._start_service(slot, 'we own it and it is not running')
        else:
            self._monitor(slot)
        self._publish(slot)

    def _start_service(self, slot, reason, moved=None):
        """Start it in its worker, within start_timeout; ``moved``:
        (switch, last owner) when the owner key was just taken, for the
        history once it runs."""
        self.decide(slot, 'start', reason)
        self._update_fence_targets()
        self._configure_replication(slot)
        may_go_on = slot.may_go_on(self.lease)
        slot.spawn('start', STARTING, lambda: slot.service.start(
            may_go_on=may_go_on, timeout=slot.conf.start_timeout),
            lambda worker: self._started(slot, worker, moved))

    def _while_busy(self, slot, owner_kv):
        """The decisions for a service whose start or stop goes on wait for
        it, but for the owner key lost meanwhile: the service is fenced at
        once (its start is cancelled) and cleaned up after its worker."""
        if slot.token and (owner_kv is None or
                           owner_kv.create_revision != slot.token):
            self.decide(slot, 'stop', 'the owner key is no longer ours (now'
                        ' %s): fenced during its %s' % (
                            slot.owner or 'free', slot.worker.what))
            slot.fenced = True
            with self._lock:
                slot.service.fence()
            slot.forget_key()
            return
        target = slot.view and slot.view.target or {}
        if slot.token and target.get('state') == 'stopped' and \
                slot.worker.what != 'stop' and slot.cancelled is None:
            # Not left to its start_timeout: stopped now, then released.
            slot.cancelled = 'stopped by %s' % intents.who(target)
            self.decide(slot, 'stop', '%s: its %s is cancelled' % (
                slot.cancelled, slot.worker.what))
            with self._lock:
                slot.service.fence()

    def _cancelled(self, slot):
        """(why, release) when a start that ended must not run here, or
        (None, False)."""
        if slot.fenced and slot.token is not None and \
                self.lease is not None and self.lease.valid:
            # Killed while the lease renewal was late; the lease held:
            # the key is still ours.
            return 'killed while its lease renewal was late', True
        if slot.fenced or slot.token is None:
            return 'fenced while starting', False
        if self.lease is None or not self.lease.valid:
            return 'lease lost while starting', False
        if self._stop.is_set():
            return 'the agent is shutting down', True
        if slot.cancelled:
            return slot.cancelled, True
        return None, False

    def _started(self, slot, worker, moved, what='start'):
        why, release = self._cancelled(slot)
        slot.cancelled = None
        if why is not None:
            # Whatever ran is killed; released when the key is still ours
            # (an operator's stop, a shutdown).
            self.decide(slot, 'stop', '%s: cleaning up' % why)
            with self._lock:
                slot.service.fence()
            slot.fenced = False
            self._stop_service(slot, release=release,
                               lease_lost=self.lease is None or
                               not self.lease.valid)
            return
        if worker.error is not None:
            e = worker.error
            reason = '%s failed at %s: %s' % (what, getattr(e, 'rid', '?'),
                                               e)
            self._keep_failure(slot, reason, worker.began)
            self._failed(slot, reason)
            return
        slot.state = RUNNING
        # What the fence kills and drops, now that the data is in place (a
        # promoted volume brings the node's partitions and addresses).
        self._update_fence_targets()
        slot.failures = 0
        slot.next_check = 0.0
        slot.facts = None  # published again from this host
        slot.next_facts = 0.0
        slot.ineligible = []
        slot.report = {}
        self._check(slot)
        if moved is not None:
            switch, last_owner = moved
            if switch and switch.get('to') == self.host:
                intents.clear(self.client, self.keys, slot.service.name,
                              'switch')
            self._record_move(slot, switch, last_owner)

    def _check(self, slot):
        statuses = slot.service.status()
        slot.resources = [(rid, st.state, st.message) for rid, st in statuses]
        slot.details = {rid: st.details for rid, st in statuses
                        if getattr(st, 'details', None)}
        return slot.resources

    def _publish(self, slot):
        """The owner's view of the service, written under its token."""
        state = {'host': self.host, 'state': slot.state,
                 'resources': slot.resources}
        if slot.details:
            state['details'] = slot.details
        if state != slot.published and \
                slot.ownership.write('state', json.dumps(state)):
            slot.published = state
        # What standbys must match, published again whenever it changes
        # (a software release or a partition added, ids changed).
        now = time.monotonic()
        if slot.state != RUNNING or now < slot.next_facts:
            return
        slot.next_facts = now + self.cluster.agent.monitor_interval
        try:
            facts = slot.service.facts()
        except Exception as e:  # a driver's bad day is not the loop's
            logger.warning('service %s: cannot publish facts: %s',
                           slot.service.name, e)
            return
        if not facts or facts == slot.facts or \
                not slot.ownership.write('facts', json.dumps(facts)):
            return
        if slot.facts is not None:
            logger.info('service %s: what a standby must match changed (%s):'
                        ' published again', slot.service.name,
                        _changes(slot.facts, facts))
        slot.facts = facts

    def _monitor(self, slot):
        now = time.monotonic()
        if now < slot.next_check:
            return
        if slot.fenced or not self.lease.valid:
            return  # killed by a fence, not failed: the lease loss decides
        slot.next_check = now + self.cluster.agent.monitor_interval
        self._update_fence_targets()  # e.g. partitions added by slapgrid
        optional = {res.rid for res in slot.service.resources
                    if res.conf.optional}
        down = [(rid, message) for rid, state, message in self._check(slot)
                if state == DOWN and rid not in optional]
        if not down:
            return
        if not self.lease.valid or slot.suspended is not None:
            return  # suspended meanwhile: down on purpose
        rid, message = down[0]
        slot.failures += 1
        if slot.failures <= slot.conf.restart:
            self.decide(slot, 'restart', '%s is down (%s): restart %d of %d'
                        % (rid, message, slot.failures, slot.conf.restart))
            may_go_on = slot.may_go_on(self.lease)

            def restart():
                slot.service.stop(timeout=slot.conf.stop_timeout)
                slot.service.start(may_go_on=may_go_on,
                                   timeout=slot.conf.start_timeout)
            failures = slot.failures
            slot.spawn('restart', STARTING, restart,
                       lambda worker: self._restarted(slot, worker,
                                                      failures))
            return
        self._failed(slot, '%s is down (%s) after %d restart(s)'
                     % (rid, message, slot.conf.restart))

    def _restarted(self, slot, worker, failures):
        self._started(slot, worker, None, what='restart')
        if slot.state == RUNNING:
            slot.failures = failures  # counted until it stays up

    def _failed(self, slot, reason):
        """A service that cannot run here: apply on_failure."""
        on_failure = slot.conf.on_failure
        name = slot.service.name
        self.decide(slot, 'failed', '%s; on_failure = %s'
                    % (reason, on_failure))
        view = slot.view
        if view and view.switch and view.switch.get('to') == self.host:
            if slot.token:
                self._abandon(slot, view.switch, reason,
                              outcome='it does not run here')
            else:
                intents.clear(self.client, self.keys, name, 'switch')
        if on_failure == 'freeze':
            # Left as it is for an operator to look at.
            intents.set_frozen(self.client, self.keys, name, True,
                               by='agent on %s' % self.host, reason=reason)
            slot.state = RUNNING if slot.state == RUNNING else STOPPED
            return
        if on_failure == 'stop':
            intents.set_target(self.client, self.keys, name, 'stopped',
                               by='agent on %s' % self.host, reason=reason)
        else:
            slot.failed_until = time.monotonic() + \
                self.cluster.agent.failed_hold
            self._announced = None
        slot.failures = 0
        self._stop_service(slot, release=True)

    def _stop_service(self, slot, release, lease_lost=False):
        """Stop the resources in reverse, in its worker, within
        stop_timeout. Without ``release``, the owner key is not ours any
        more (or goes with the lost lease): forgotten at once."""
        if not release:
            slot.forget_key()
        slot.spawn('stop', STOPPING, lambda: self._stop_work(slot),
                   lambda worker: self._stopped(slot, worker, release,
                                                lease_lost))

    def _stop_work(self, slot):
        """In the worker: (error, [(rid, status) still not down]). A stop
        that fails is escalated to a fence."""
        try:
            slot.service.stop(timeout=slot.conf.stop_timeout)
        except Exception as e:
            if not isinstance(e, ServiceError):  # a bug: said, not raised
                e = ServiceError(getattr(e, 'rid', 'service'), '%s: %s' % (
                    type(e).__name__, e))
            with self._lock:
                slot.service.fence()
            return e, [(rid, st) for rid, st in slot.service.status()
                       if st.state not in (DOWN, NA)]
        return None, []

    def _stopped(self, slot, worker, release, lease_lost):
        """If a resource is still not down after the stop and its fence, or
        a fenced start or stop of it still goes on, the service is not
        released: nobody may start it while it half-runs here."""
        e, left = worker.result or (worker.error, [])
        switch, slot.switching = slot.switching, None
        busy = slot.service.busy()
        if busy:
            with self._lock:
                slot.service.fence()
            slot.state = STOP_FAILED
            slot.lingering = busy
            self.decide(slot, 'refuse', '%s, fenced, still goes on: not'
                        ' releasing it' % busy, once=True)
            self._check(slot)
            self._update_fence_targets()
            return
        slot.lingering = None
        slot.fenced = False  # cleaned up
        if e is not None:
            if left and not lease_lost:
                rid, st = left[0]
                slot.state = STOP_FAILED
                self.decide(slot, 'refuse', 'stop failed at %s (%s) and %s'
                            ' is still %s: not releasing it' % (
                                e.rid, e, rid, st.state))
                self._check(slot)
                self._update_fence_targets()
                return
            self.decide(slot, 'fence', 'stop failed at %s (%s): killed'
                        % (e.rid, e))
        slot.state = STOPPED
        slot.resources = []
        slot.published = None
        missed = self._handover_missed(slot, switch) if release and \
            slot.token and switch else None
        if missed:
            # Its target would start from an older copy: what was written
            # since would be missing there. It starts here again instead.
            self._abandon(slot, switch, missed, 'it starts here again')
            self._update_fence_targets()
            return
        if release and slot.token:
            try:
                slot.ownership.release()
            except EtcdError as e:
                logger.warning('service %s: could not release the owner key'
                               ' (%s); it expires with the lease',
                               slot.service.name, e)
        slot.forget_key()
        self._update_fence_targets()
