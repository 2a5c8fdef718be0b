"""The agent: the daemon on every host that turns ownership into services.

Each cycle (every ``[agent] loop_interval``) reads the world from etcd,
decides for each service, acts, and says why in one log line per decision,
as Patroni's HA loop does. The lease is renewed in a thread of its own
(:class:`~slaposha.cluster.lease.HostLease`); when it is lost, that thread
fences at once (kills the services' cgroups) and the next cycle cleans up.
A separate watchdog process fences too if the agent itself is frozen.

A service runs only where its owner key is held (DESIGN.md 2):

- owned here: start it if it is not running; check it every
  ``monitor_interval``; restart a failed resource in place up to
  ``restart`` times, then apply ``on_failure``;
- owned elsewhere: make sure it is not running here;
- not owned: with ``orchestrate = ha``, the most preferred live eligible host
  takes the owner key and starts it; the others wait.
"""

import json
import logging
import os
import signal
import socket
import threading
import time

from slaposha import __version__
from slaposha.cgroup import Cgroup, own_cgroup
from slaposha.cluster.etcd import Client, EtcdError
from slaposha.cluster.lease import HostLease, Membership, Ownership, keys
from slaposha.cluster.member import EtcdMember
from slaposha.config import load_services
from slaposha.service import Service, ServiceError
from slaposha.watchdog import Watchdog

__all__ = ['Agent', 'default_host', 'run_witness']

logger = logging.getLogger('slaposha.agent')

# Service states on this host.
STOPPED, RUNNING, FAILED = 'stopped', 'running', 'failed'


def default_host():
    return socket.gethostname().split('.')[0]


class ServiceSlot(object):
    """What the agent knows of one service on this host."""

    def __init__(self, service, ownership):
        self.service = service
        self.conf = service.conf.service
        self.ownership = ownership
        self.state = STOPPED
        self.owner = None          # host named by the owner key
        self.token = None          # fencing token while owned here
        self.decision = None       # (time, action, reason)
        self.failures = 0
        self.failed_until = 0.0
        self.next_check = 0.0
        self.fenced = False


class Agent(object):

    def __init__(self, cluster, host=None, services=None):
        self.cluster = cluster
        self.host = host or default_host()
        self.keys = keys(cluster.etcd.prefix, cluster.name)
        lease = cluster.lease
        endpoints = cluster.etcd_endpoints()
        if cluster.etcd.mode == 'embedded':
            # Our own member answers fastest: try it first.
            mine = endpoints[cluster.members.index(self.host)]
            endpoints = [mine] + [e for e in endpoints if e != mine]
        self.tls = cluster.tls_files(self.host)
        client_options = dict(request_timeout=lease.request_timeout,
                              retry_interval=lease.retry_interval,
                              tls=self.tls)
        self.client = Client(endpoints, timeout=lease.request_timeout * 2,
                             **client_options)
        # Renewals get their own connections: they never queue behind a read.
        self.lease_client = Client(endpoints, **client_options)
        self.membership = Membership(self.client, self.keys, self.host)
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
        run_dir = cluster.cluster.run_dir
        self.status_path = os.path.join(run_dir, 'agent.json')
        self.log_dir = os.path.join(cluster.cluster.state_dir, 'log')
        self.cgroup_root = Cgroup(os.path.join(own_cgroup(), 'slaposha'))
        confs = services if services is not None else load_services(cluster)
        self.slots = {}
        for conf in confs:
            if self.host not in conf.service.hosts:
                continue
            svc = Service(conf, self.cgroup_root, self.log_dir)
            self.slots[conf.name] = ServiceSlot(
                svc, Ownership(self.client, self.keys, conf.name, self.host))

    # -- decisions ----------------------------------------------------------

    def decide(self, slot, action, reason):
        """Record and log one decision: what the agent does and why."""
        slot.decision = (time.time(), action, reason)
        logger.info('service %s: %s: %s', slot.service.name, action, reason)

    # -- life cycle -----------------------------------------------------------

    def start(self):
        for d in (self.cluster.cluster.run_dir, self.cluster.cluster.state_dir,
                  self.log_dir):
            os.makedirs(d, exist_ok=True)
        self.cgroup_root.create()
        # Nothing can legitimately run before we hold a lease: a previous
        # agent's leftovers are killed.
        for slot in self.slots.values():
            if slot.service.cgroup.exists() and slot.service.cgroup.pids():
                slot.service.fence()
                self.decide(slot, 'fence', 'processes left by a previous'
                            ' agent, before any lease is held')
        if self.cluster.etcd.mode == 'embedded':
            self.member = EtcdMember(self.cluster, self.host,
                                     tls=self.tls).start()
        self.watchdog = Watchdog().start()
        self.started = time.monotonic()
        logger.info('agent %s %s: %d service(s) here: %s', self.host,
                    __version__, len(self.slots), ' '.join(self.slots) or '-')

    def run(self):
        """Run until stop() (or SIGTERM / SIGINT through the CLI)."""
        self.start()
        interval = self.cluster.agent.loop_interval
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    self.tick()
                except Exception:  # one bad cycle must not end the agent
                    logger.exception('cycle failed')
                self.write_status()
                self._stop.wait(max(0.0, interval -
                                    (time.monotonic() - began)))
        finally:
            self.shutdown()

    def stop(self):
        self._stop.set()

    def shutdown(self):
        """Stop services here, hand ownership back, leave the cluster."""
        for slot in self.slots.values():
            if slot.state == RUNNING or slot.token:
                self.decide(slot, 'stop', 'the agent is shutting down')
                self._stop_service(slot, release=True)
        if self.lease is not None:
            self.lease.revoke()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.member is not None:
            self.member.stop()
        self.write_status()

    # -- the lease ------------------------------------------------------------

    def _grant(self):
        try:
            lease = HostLease(
                self.lease_client, self.cluster.lease.ttl,
                self.cluster.lease.renew_interval,
                self.cluster.lease.retry_interval,
                self.cluster.lease.request_timeout,
                self.cluster.lease.fence_margin,
                on_renewed=self._on_renewed, on_lost=self._on_lost)
            lease.grant()
        except EtcdError as e:
            self._etcd_down('cannot get a lease: %s' % e)
            return False
        self.lease = lease
        self._announced = None
        logger.info('lease %x granted (ttl %ss)', lease.id, lease.ttl)
        return True

    def _on_renewed(self, deadline):
        cgroups, addresses = self._fence_targets
        if self.watchdog is not None:
            self.watchdog.arm(deadline, cgroups, addresses)

    def _on_lost(self, reason):
        # Runs in the renewal thread, at the deadline at the latest: kill
        # first, clean up in the next cycle.
        with self._lock:
            for slot in self.slots.values():
                if slot.state == RUNNING or slot.token:
                    slot.service.fence()
                    slot.fenced = True
                    logger.warning('service %s: fence: lease lost: %s',
                                   slot.service.name, reason)

    def _update_fence_targets(self):
        cgroups, addresses = [], []
        for slot in self.slots.values():
            if slot.token or slot.state == RUNNING:
                c, a = slot.service.fence_targets()
                cgroups += c
                addresses += a
        self._fence_targets = (cgroups, addresses)
        if self.lease is not None and self.lease.valid:
            self._on_renewed(self.lease.deadline)

    def _etcd_down(self, problem):
        if problem != self.etcd_problem:
            logger.warning('etcd: %s', problem)
        self.etcd_problem = problem

    # -- one cycle ------------------------------------------------------------

    def tick(self):
        if self.lease is None or not self.lease.valid:
            self._after_lease_loss()
            if not self._grant():
                return
        try:
            self._announce()
            owners = {kv.key: kv for kv in
                      self.client.get_prefix(self.keys.services)}
            alive = self.membership.alive()
        except EtcdError as e:
            # Keep what runs: the lease thread fences at the deadline if
            # etcd stays out of reach.
            self._etcd_down('cannot read the cluster: %s' % e)
            return
        self.etcd_problem = None
        for name, slot in sorted(self.slots.items()):
            self._decide(slot, owners.get(self.keys.owner(name)), alive)
        self._place_leader(owners)

    def _place_leader(self, owners):
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
        if not any(slot.token for slot in self.slots.values()):
            return
        mine = self.member.client_url
        try:
            if not self.client.status(mine).is_leader:
                return
            owning = {kv.value for key, kv in owners.items()
                      if key.endswith('/owner')}
            ids = {m.name: m.id for m in self.client.members()}
            for name in self.cluster.cluster.witnesses + \
                    self.cluster.cluster.hosts:
                if name == self.host or name in owning or name not in ids:
                    continue
                self.client.move_leader(ids[name], mine)
                logger.info('etcd: moved raft leadership from %s to %s: %s'
                            ' owns services (leader_placement = away)',
                            self.host, name, self.host)
                return
        except EtcdError as e:
            logger.info('etcd: could not move raft leadership: %s', e)

    def _health(self):
        now = time.monotonic()
        return {'address': self.cluster.hosts[self.host].address,
                'pid': os.getpid(), 'version': __version__,
                'failed': sorted(n for n, s in self.slots.items()
                                 if s.failed_until > now)}

    def _announce(self):
        health = self._health()
        if health != self._announced:
            self.membership.announce(self.lease.id, health)
            self._announced = health

    def _after_lease_loss(self):
        for slot in self.slots.values():
            if slot.state == RUNNING or slot.token or slot.fenced:
                reason = self.lease.lost_reason if self.lease else 'no lease'
                self.decide(slot, 'stop', 'lease lost (%s): services'
                            ' fenced, cleaning up' % reason)
                with self._lock:
                    slot.service.fence()
                self._stop_service(slot, release=False)
                slot.fenced = False

    def _candidate(self, slot, alive):
        """The host that should take a free service: the most preferred
        live host that did not just fail it. Just after the agent started,
        a more preferred host that has not joined yet is waited for."""
        starting = time.monotonic() - self.started < \
            self.cluster.agent.startup_grace
        for host in slot.conf.hosts:
            health = alive.get(host)
            if health is None:
                if starting:
                    if slot.decision is None or slot.decision[1] != 'wait':
                        self.decide(slot, 'wait', '%s is preferred and has'
                                    ' not joined yet (startup grace %gs)'
                                    % (host, self.cluster.agent.startup_grace))
                    return None
                continue
            if slot.service.name in health.get('failed', ()):
                continue
            return host
        return None

    def _decide(self, slot, owner_kv, alive):
        slot.owner = owner_kv.value if owner_kv else None
        if slot.token:
            if owner_kv is None or owner_kv.create_revision != slot.token:
                self.decide(slot, 'stop', 'the owner key is no longer ours'
                            ' (now %s)' % (slot.owner or 'free'))
                slot.ownership.forget()
                slot.token = None
                self._stop_service(slot, release=False)
                return
            if slot.state != RUNNING:
                self._start_service(slot, 'we own it and it is not running')
            else:
                self._monitor(slot)
            return
        if owner_kv is not None:
            if slot.state == RUNNING:
                self.decide(slot, 'stop', 'it is owned by %s' % slot.owner)
                self._stop_service(slot, release=False)
            return
        if slot.conf.orchestrate != 'ha':
            return
        candidate = self._candidate(slot, alive)
        if candidate != self.host:
            return
        token = slot.ownership.acquire(self.lease.id)
        if token is None:
            holder = slot.ownership.holder
            self.decide(slot, 'wait', '%s took the owner key first'
                        % (holder.value if holder else 'another host'))
            return
        slot.token = token
        slot.owner = self.host
        self._start_service(slot, 'took the owner key with token %d: %s is'
                            ' the preferred live host' % (token, self.host))

    def _start_service(self, slot, reason):
        self.decide(slot, 'start', reason)
        self._update_fence_targets()
        try:
            slot.service.start(may_go_on=lambda: self.lease.valid)
        except ServiceError as e:
            self._failed(slot, 'start failed at %s: %s' % (e.rid, e))
            return
        if not self.lease.valid:
            # Lost while starting: whatever started after the fence dies.
            with self._lock:
                slot.service.fence()
            self.decide(slot, 'stop', 'lease lost while starting')
            slot.state = STOPPED
            return
        slot.state = RUNNING
        slot.next_check = time.monotonic() + \
            self.cluster.agent.monitor_interval
        self._publish(slot)

    def _publish(self, slot):
        """The owner's view of the service, written under its token."""
        try:
            slot.ownership.write('state', json.dumps({
                'host': self.host, 'state': slot.state,
                'since': time.time()}))
        except EtcdError as e:
            logger.info('service %s: could not publish state: %s',
                        slot.service.name, e)

    def _monitor(self, slot):
        now = time.monotonic()
        if now < slot.next_check:
            return
        slot.next_check = now + self.cluster.agent.monitor_interval
        down = [(rid, st) for (rid, st), res in
                zip(slot.service.status(), slot.service.resources)
                if st.state == 'down' and not res.conf.optional]
        if not down:
            slot.failures = 0
            return
        rid, st = down[0]
        slot.failures += 1
        if slot.failures <= slot.conf.restart:
            self.decide(slot, 'restart', '%s is down (%s): restart %d of %d'
                        % (rid, st.message, slot.failures, slot.conf.restart))
            try:
                slot.service.stop()
                slot.service.start(may_go_on=lambda: self.lease.valid)
            except ServiceError as e:
                self._failed(slot, 'restart failed at %s: %s' % (e.rid, e))
            return
        self._failed(slot, '%s is down (%s) after %d restart(s)'
                     % (rid, st.message, slot.conf.restart))

    def _failed(self, slot, reason):
        """A service that cannot run here: stop it, and let another host
        have it (on_failure = switch)."""
        self.decide(slot, 'failed', '%s; on_failure = %s'
                    % (reason, slot.conf.on_failure))
        self._stop_service(slot, release=True)
        slot.failures = 0
        slot.failed_until = time.monotonic() + \
            self.cluster.agent.failed_hold

    def _stop_service(self, slot, release):
        try:
            slot.service.stop()
        except ServiceError as e:
            self.decide(slot, 'fence', 'stop failed at %s (%s): killing'
                        % (e.rid, e))
            slot.service.fence()
        slot.state = STOPPED
        if release and slot.token:
            try:
                slot.ownership.release()
            except EtcdError as e:
                logger.warning('service %s: could not release the owner key'
                               ' (%s); it expires with the lease',
                               slot.service.name, e)
        slot.ownership.forget()
        slot.token = None
        self._update_fence_targets()

    # -- status -----------------------------------------------------------------

    def status(self):
        lease = self.lease
        return {
            'host': self.host, 'pid': os.getpid(), 'version': __version__,
            'time': time.time(),
            'lease': None if lease is None else {
                'id': '%x' % lease.id, 'valid': lease.valid,
                'time_left': round(lease.time_left(), 3),
                'lost': lease.lost_reason},
            'etcd': self.etcd_problem or 'ok',
            'services': {
                name: {'state': slot.state, 'owner': slot.owner,
                       'token': slot.token,
                       'decision': slot.decision}
                for name, slot in self.slots.items()},
        }

    def write_status(self):
        tmp = self.status_path + '.tmp'
        try:
            with open(tmp, 'w') as f:
                json.dump(self.status(), f)
            os.rename(tmp, self.status_path)
        except OSError:
            pass


def run_witness(cluster, host, stop_event):
    """Run only the etcd member of a witness host until ``stop_event``."""
    if cluster.etcd.mode != 'embedded':
        raise ValueError('a witness runs an embedded etcd member: [etcd]'
                         ' mode is external')
    for d in (cluster.cluster.run_dir, cluster.cluster.state_dir):
        os.makedirs(d, exist_ok=True)
    member = EtcdMember(cluster, host, tls=cluster.tls_files(host)).start()
    logger.info('witness %s: etcd member on %s', host, member.client_url)
    try:
        stop_event.wait()
    finally:
        member.stop()


def install_stop_signals(stop):
    """SIGTERM and SIGINT end the agent cleanly."""
    def handler(signum, frame):
        logger.info('signal %d: stopping', signum)
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
