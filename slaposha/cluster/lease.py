"""The host lease, ownership of services and membership (DESIGN.md 2).

Each agent holds one etcd lease. Its membership key and the owner keys of
the services it runs are attached to it, so that when the host is lost they
all vanish together, TTL seconds after its last renewal.

- :class:`HostLease` grants the lease and renews it in a thread of its own
  (a slow service start never delays a renewal). Its *deadline* is the send
  time of the last good renewal + TTL - fence_margin: etcd cannot expire the
  lease before it; there the services are suspended (frozen, addresses
  dropped). Renewals go on until the *kill deadline*, that send time + TTL
  - kill_margin, still before etcd can expire the lease: a renewal answered
  by then resumes them (the lease never expired, the owner keys on it were
  never anyone else's); past it, or when etcd says the lease is gone, the
  lease is lost and the services killed, before any peer can start them.
- :class:`Ownership` takes a service's owner key with a transaction that
  succeeds only if the key does not exist. The key's create revision is the
  owner's *fencing token*; every write the owner makes about the service is
  a transaction conditional on it, so a deposed owner cannot write.
- :class:`Membership` publishes this host's health under the lease and
  reads the others'.

Where these keys live: :mod:`slaposha.cluster.keys`.
"""

import json
import logging
import queue
import threading
import time

from slaposha.cluster.etcd import (
    Compare, EtcdError, LeaseNotFound, Op)
from slaposha.inputs import MAX_VALUE, InputError, check_fields, loads

__all__ = ['HostLease', 'Ownership', 'Membership', 'alive_hosts',
           'VALID', 'SUSPENDED', 'LOST']

# HostLease.state(): renewed in time; late (services suspended, renewals
# going on); lost (services killed).
VALID, SUSPENDED, LOST = 'valid', 'suspended', 'lost'

logger = logging.getLogger(__name__)


class HostLease(object):
    """This host's lease, renewed in a thread, with its self-fence deadline
    and its kill deadline.

    ``on_renewed(kill_deadline)`` is called after each good renewal (the
    agent pets its watchdog there: to kill halfway between the deadline
    and the kill deadline, or at the kill deadline once suspended);
    ``on_suspended(reason)`` when the deadline passed without a renewal,
    ``on_resumed(seconds)`` when a renewal is answered before the kill
    deadline after it;
    ``on_lost(reason)`` once when the lease is lost: etcd says it is gone,
    or the kill deadline passed without a renewal. All run in the renewal
    thread and must be quick. ``kill_margin`` None (or equal to
    fence_margin): no suspension, lost at the deadline.
    """

    def __init__(self, client, ttl, renew_interval, retry_interval,
                 request_timeout, fence_margin, on_renewed=None,
                 on_lost=None, kill_margin=None, on_suspended=None,
                 on_resumed=None):
        self.client = client
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.retry_interval = retry_interval
        self.request_timeout = request_timeout
        self.fence_margin = fence_margin
        self.kill_margin = fence_margin if kill_margin is None else \
            min(kill_margin, fence_margin)
        self.on_renewed = on_renewed
        self.on_lost = on_lost
        self.on_suspended = on_suspended
        self.on_resumed = on_resumed
        self.id = None
        self.deadline = None
        self.kill_deadline = None
        self.suspended_since = None   # the deadline passed, not lost yet
        self.suspensions = 0
        self.lost_reason = None
        self.renewals = 0
        self.failures = 0
        self.latency = None        # seconds the last renewal took
        self._stop = threading.Event()
        self._thread = None

    def grant(self, timeout=None):
        """Grant a new lease and start renewing it; returns its id.
        Raises EtcdError when etcd cannot grant one (no quorum)."""
        sent = time.monotonic()
        lease = self.client.grant(self.ttl, timeout=timeout or
                                  self.request_timeout * 2)
        self.id = lease.id
        self.deadline = sent + lease.ttl - self.fence_margin
        self.kill_deadline = sent + lease.ttl - self.kill_margin
        self.suspended_since = None
        self.lost_reason = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop,
                                        name='lease-%x' % lease.id,
                                        daemon=True)
        self._thread.start()
        if self.on_renewed:
            self.on_renewed(self.kill_deadline)
        return lease.id

    def state(self):
        """VALID: renewed in time, services may run and start; SUSPENDED:
        the deadline passed (or a resume is under way), the lease still
        exists in etcd, the services are suspended and nothing starts;
        LOST: etcd says it is gone or may expire it now."""
        if self.id is None or self.lost_reason is not None:
            return LOST
        now = time.monotonic()
        if now >= self.kill_deadline:
            return LOST
        if now >= self.deadline or self.suspended_since is not None:
            return SUSPENDED
        return VALID

    @property
    def valid(self):
        """True while the lease surely exists in etcd and was renewed in
        time: services may run and start."""
        return self.state() == VALID

    @property
    def suspended(self):
        return self.state() == SUSPENDED

    def time_left(self):
        if not self.valid:
            return 0.0
        return self.deadline - time.monotonic()

    def _lose(self, reason):
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        logger.warning('lease %x lost: %s', self.id or 0, reason)
        if self.on_lost:
            self.on_lost(reason)

    def _suspend(self):
        """The deadline passed: suspend the services, renew on."""
        self.suspended_since = time.monotonic()
        self.suspensions += 1
        late = self.suspended_since - (self.deadline - self.ttl +
                                       self.fence_margin)
        reason = 'lease renewal late: none answered for %.1f s' % late
        logger.warning('lease %x: %s: services suspended until a renewal'
                       ' is answered, killed in %.1f s if none is', self.id,
                       reason, self.kill_deadline - self.suspended_since)
        if self.on_suspended:
            self.on_suspended(reason)

    def _bound(self):
        """The next moment the renewal thread must act by: the deadline
        (suspend there), then the kill deadline; None once that passed.
        Suspends when the deadline passed."""
        now = time.monotonic()
        if now >= self.kill_deadline:
            return None
        if now >= self.deadline:
            if self.suspended_since is None:
                self._suspend()
            return self.kill_deadline
        return self.deadline

    def _renew_loop(self):
        lease_id = self.id
        next_send = time.monotonic() + self.renew_interval
        failing = False     # the last renewal failed
        while not self._stop.is_set():
            now = time.monotonic()
            if not failing:
                failing_since = now
            bound = self._bound()
            if bound is None:
                self._lose('no renewal answered for %.1f s (kill deadline'
                           ' passed: etcd may expire the lease now)'
                           % (self.ttl - self.kill_margin))
                return
            wait = min(next_send, bound) - now
            if wait > 0 and self._stop.wait(wait):
                return
            bound = self._bound()
            if bound is None or time.monotonic() >= bound:
                continue
            sent = time.monotonic()
            try:
                if failing:
                    sent, ttl = self._renew_everywhere(lease_id)
                else:
                    ttl = self.client.keepalive(
                        lease_id, timeout=max(0.01, min(
                            self.request_timeout, bound - sent)))
            except LeaseNotFound:
                self._lose('etcd says the lease is gone (it expired or was'
                           ' revoked)')
                return
            except EtcdError as e:
                self.failures += 1
                logger.info('lease %x renewal failed (%s); renewing through'
                            ' every endpoint, on new connections, every'
                            ' %.1f s', lease_id, e, self.retry_interval)
                failing = True
                next_send = time.monotonic()
                continue
            if ttl is None:
                continue    # no answer before the deadline, or stopped
            if failing:
                logger.info('lease %x renewed again after %.1f s of failed'
                            ' renewals', lease_id, time.monotonic() -
                            failing_since)
            failing = False
            if self._stop.is_set():
                return
            if time.monotonic() >= self.kill_deadline:
                # Answered too late (this process was not scheduled, the
                # answer was slow): the agent and the watchdog killed the
                # services at the kill deadline and may have moved on to a
                # new lease. Lost for good: renewing it now would keep its
                # keys, the owner keys among them, alive for nobody, and no
                # peer could take the services over.
                self._lose('the renewal was answered after the self-fence'
                           ' deadline (the kill deadline: etcd may have'
                           ' expired the lease)')
                return
            if time.monotonic() >= self.deadline and \
                    self.suspended_since is None:
                # Answered late, this thread not scheduled at the deadline:
                # the watchdog may have suspended the services meanwhile.
                self._suspend()
            self.renewals += 1
            self.latency = time.monotonic() - sent  # for the metrics
            self.deadline = max(self.deadline, sent + min(ttl, self.ttl)
                                - self.fence_margin)
            self.kill_deadline = max(self.kill_deadline, sent + min(
                ttl, self.ttl) - self.kill_margin)
            next_send = sent + self.renew_interval
            # The watchdog petted with the new deadline first: it must not
            # act on the old one once the services are resumed.
            if self.on_renewed:
                self.on_renewed(self.kill_deadline)
            if self.suspended_since is not None:
                self._resume()

    def _resume(self):
        """A renewal answered after the deadline, before the kill deadline:
        etcd kept the lease (an expired lease is never renewed), so the
        services are resumed as they were."""
        late = time.monotonic() - self.suspended_since
        logger.warning('lease %x renewed %.1f s after its deadline: the'
                       ' lease never expired, services resumed', self.id,
                       late)
        try:
            if self.on_resumed:
                self.on_resumed(late)
        finally:
            self.suspended_since = None

    def _renew_everywhere(self, lease_id):
        """Renewals after a failed one: one to every endpoint at once, each
        on a new connection, and again every retry_interval without waiting
        for those in flight, until one is answered. The link coming back is
        used at once: no renewal waits on a connection whose packets were
        lost (TCP retransmits them seconds later), nor on a member that
        cannot reach its leader yet.

        Returns (send time, TTL) of the first renewal answered, the send
        time of that very request (the deadline counts from it); (None,
        None) when none was answered before the kill deadline or the lease
        is stopped (the services are suspended at the deadline meanwhile).
        Raises LeaseNotFound when etcd says the lease is gone.
        """
        answers = queue.Queue()

        def renew(endpoint, sent, timeout):
            try:
                answers.put((sent, self.client.keepalive_at(
                    lease_id, endpoint, timeout), None))
            except EtcdError as e:
                answers.put((sent, None, e))
            except Exception as e:  # a bug must not hang the lease
                answers.put((sent, None, EtcdError(repr(e))))

        next_round = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            bound = self._bound()
            if bound is None:
                return None, None
            if now >= next_round:
                timeout = max(0.01, min(self.request_timeout,
                                        self.kill_deadline - now))
                for endpoint in self.client.endpoints:
                    threading.Thread(target=renew, daemon=True,
                                     name='renew-%x' % lease_id,
                                     args=(endpoint, now, timeout)).start()
                next_round = now + self.retry_interval
            try:
                sent, ttl, error = answers.get(timeout=max(0.0, min(
                    next_round, bound) - time.monotonic()))
            except queue.Empty:
                continue
            if ttl:
                return sent, ttl
            if isinstance(error, LeaseNotFound):
                raise error
            self.failures += 1
            logger.debug('lease %x renewal failed: %s', lease_id, error)
        return None, None

    def stop(self):
        self._stop.set()
        if self._thread is not None and \
                self._thread is not threading.current_thread():
            self._thread.join(2)

    def revoke(self):
        """Give the lease back (clean shutdown): every key on it goes at
        once, so peers take over in one round trip instead of a TTL."""
        self.stop()
        if self.id is not None and self.lost_reason is None:
            try:
                self.client.revoke(self.id, timeout=self.request_timeout * 2)
            except EtcdError as e:
                logger.warning('could not revoke lease %x: %s', self.id, e)
        self.lost_reason = self.lost_reason or 'revoked'


class Ownership(object):
    """The owner key of one service, and the writes its owner makes."""

    def __init__(self, client, keys, service, host, claims=()):
        self.client = client
        self.keys = keys
        self.service = service
        self.host = host
        self.key = keys.owner(service)
        # Keys taken with the owner key, on the same lease, that must be
        # free too (slaposha.placement: exclusive services on one host).
        self.claims = list(claims)
        self.token = None
        self.holder = None
        self.blocker = None

    def acquire(self, lease_id, timeout=None):
        """Take the owner key (and the claims) if all are free. Returns the
        fencing token, or None with the current owner's KeyValue in
        ``self.holder`` and the first claim found taken in ``self.blocker``
        (its value names the service that holds it)."""
        keys = [self.key] + self.claims
        result = self.client.txn(
            compare=[Compare.create_revision(k, '==', 0) for k in keys],
            success=[Op.put(k, self.host if k == self.key else self.service,
                            lease=lease_id) for k in keys],
            failure=[Op.range(k) for k in keys], timeout=timeout)
        if result.succeeded:
            self.token = result.revision
            self.holder = self.blocker = None
            return self.token
        found = [(r[0] if r else None) for r in result.responses]
        found += [None] * (len(keys) - len(found))
        self.holder = found[0]
        self.blocker = next((kv for kv in found[1:] if kv is not None), None)
        # A replayed txn (its first answer lost) fails on our own key.
        if self.holder is not None and self.holder.lease == lease_id and \
                self.holder.value == self.host:
            self.token = self.holder.create_revision
            self.blocker = None
            return self.token
        self.token = None
        return None

    def guard(self, token=None):
        return [Compare.create_revision(self.key, '==', token or self.token)]

    def write(self, key, value, token=None, timeout=None):
        """Put ``services/<name>/<key>`` only while ``token`` (default: ours)
        is the owner's. Returns False when refused: we are not the owner."""
        token = token or self.token
        if not token:
            return False
        result = self.client.txn(
            compare=self.guard(token),
            success=[Op.put(self.keys.service(self.service, key), value)],
            timeout=timeout)
        return result.succeeded

    def release(self, timeout=None):
        """Delete the owner key if it is still ours (planned stop or switch).
        Returns True when it was ours."""
        if not self.token:
            return False
        result = self.client.txn(compare=self.guard(),
                                 success=[Op.delete(k) for k in
                                          [self.key] + self.claims],
                                 timeout=timeout)
        self.token = None
        return result.succeeded

    def forget(self):
        """The lease was lost: whatever the key says, it is not ours."""
        self.token = None


# What a host's membership value holds (the agent's _health) as the others
# read it (inputs.check_fields).
HEALTH = {'address': (str, None), 'pid': (int, None), 'version': (str, None),
          'failed': ([str], None), 'ineligible': (dict, None),
          'services': (dict, None), 'cannot_run': (str, None)}


class Membership(object):
    """This host's membership key, and the view of every host's."""

    def __init__(self, client, keys, host):
        self.client = client
        self.keys = keys
        self.host = host

    def announce(self, lease_id, health, timeout=None):
        self.client.put(self.keys.host(self.host), json.dumps(
            health, sort_keys=True), lease=lease_id, timeout=timeout)

    def alive(self, timeout=None):
        """{host: health} of every host whose lease holds; a health that
        is not as HEALTH says is {"error": why}."""
        return alive_hosts(self.client.get_prefix(self.keys.hosts,
                                                  timeout=timeout), self.keys)


def alive_hosts(kvs, keys):
    """{host: health} of the membership keys among ``kvs`` (other keys are
    left out), as read or as a watch keeps them; a health that is not as
    HEALTH says is {"error": why}."""
    hosts = {}
    for kv in kvs:
        if not kv.key.startswith(keys.hosts):
            continue
        name = kv.key[len(keys.hosts):]
        try:
            hosts[name] = check_fields(
                loads(kv.value, MAX_VALUE, 'membership of %s' % name),
                HEALTH, 'membership of %s' % name)
        except InputError as e:
            hosts[name] = {'error': 'unreadable: %s' % e}
    return hosts
