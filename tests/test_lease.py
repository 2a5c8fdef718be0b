"""The host lease, ownership and the watchdog, against a real etcd on
127.0.0.1 and real cgroups."""

import json
import os
import signal
import subprocess
import time

import pytest

from slaposha.cgroup import Cgroup, cgroup2_mount
from slaposha.cluster.etcd import Client, EtcdError
from slaposha.cluster.keys import Keys
from slaposha.cluster.lease import HostLease, Membership, Ownership
from slaposha.watchdog import Watchdog

from test_etcd_client import (  # noqa: F401 (silent_url: a fixture)
    FAST_ELECTIONS, etcd_cluster, needs_etcd, silent_url)

TTL, RENEW, RETRY, REQUEST, MARGIN = 3, 1.0, 0.2, 0.5, 0.5


@pytest.fixture(scope='module')
def member(tmp_path_factory):
    with etcd_cluster(tmp_path_factory.mktemp('etcd'), 1,
                      FAST_ELECTIONS) as members:
        yield members[0]


@pytest.fixture
def client(member):
    c = Client([member.url], request_timeout=REQUEST, retry_interval=RETRY,
               timeout=2)
    yield c
    c.close()


def host_lease(client, **callbacks):
    return HostLease(client, TTL, RENEW, RETRY, REQUEST, MARGIN, **callbacks)


@needs_etcd
def test_deadline_follows_the_send_time_of_the_last_renewal(client):
    renewed = []
    lease = host_lease(client, on_renewed=renewed.append)
    sent = time.monotonic()
    lease.grant()
    try:
        assert abs(lease.deadline - (sent + TTL - MARGIN)) < 0.1
        time.sleep(RENEW * 2.5)
        assert lease.renewals >= 2
        # The deadline moved with the renewals, from their send times.
        assert lease.deadline > sent + TTL - MARGIN + RENEW
        assert lease.deadline <= time.monotonic() + TTL - MARGIN
        assert renewed == sorted(renewed) and len(renewed) >= 3
        assert lease.valid
    finally:
        lease.revoke()
    assert not lease.valid


@needs_etcd
def test_unreachable_etcd_loses_the_lease_at_the_deadline(client, member):
    lost = []
    lease = host_lease(client, on_lost=lambda reason: lost.append(
        (time.monotonic(), reason)))
    lease.grant()
    time.sleep(0.3)
    last_deadline = lease.deadline
    os.kill(member.process.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        deadline = stopped + TTL + 1
        while not lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lost, 'the lease was never declared lost'
        at, reason = lost[0]
        assert 'deadline passed' in reason
        # Lost at the deadline known when etcd stopped answering (give or
        # take the renewal that may have been in flight), never later.
        assert at - last_deadline < RENEW + 0.15
        assert at < stopped + TTL - MARGIN + 0.15
        assert not lease.valid
    finally:
        os.kill(member.process.pid, signal.SIGCONT)
        lease.stop()


@needs_etcd
def test_a_failed_renewal_is_sent_again_to_every_endpoint_at_once(
        member, silent_url, tmp_path):
    # Two endpoints that never answer (a member behind a cut link, a
    # connection whose packets were lost) before the one that does: the
    # renewal after the failed one does not wait for them in turn.
    import socket
    other = socket.socket()
    other.bind(('127.0.0.1', 0))
    other.listen(64)
    client = Client([silent_url, 'http://127.0.0.1:%d' %
                     other.getsockname()[1], member.url],
                    request_timeout=REQUEST, retry_interval=RETRY, timeout=2)
    renewed, lost = [], []
    lease = host_lease(client, on_renewed=lambda d: renewed.append(
        (time.monotonic(), d)), on_lost=lost.append)
    client._remember(member.url)   # granted at once
    lease.grant()
    client.prefer_first()           # then renewed through a silent one
    try:
        time.sleep(3 * RENEW + 0.5)
        assert not lost and lease.valid
        assert lease.failures >= 1 and lease.renewals >= 2
        times = [t for t, _ in renewed]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # One failed request, then the member answers at once (in turn,
        # the second silent endpoint and a retry_interval came first).
        assert max(gaps) < RENEW + REQUEST + 0.3, gaps
        # Every deadline counts from a send time: never later than a TTL
        # from when it was known.
        assert all(d <= t + TTL - MARGIN for t, d in renewed)
        # The member that answered is asked first next time.
        assert client.endpoint == member.url
    finally:
        lease.revoke()
        client.close()
        other.close()


@needs_etcd
def test_revoked_lease_is_lost_at_the_next_renewal(client, member):
    lost = []
    lease = host_lease(client, on_lost=lost.append)
    lease.grant()
    Client([member.url]).revoke(lease.id)
    revoked = time.monotonic()
    while not lost and time.monotonic() - revoked < RENEW + 1:
        time.sleep(0.02)
    assert lost and 'gone' in lost[0]
    assert time.monotonic() - revoked < RENEW + 0.5
    lease.stop()


class LateAnswers(object):
    """A client whose lease renewals, once ``late`` is set, answer after
    the lease's self-fence deadline (the agent's process was not scheduled
    in time, or the answer was slow)."""

    def __init__(self, client):
        self.client = client
        self.lease = None
        self.late = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def keepalive(self, lease_id, timeout=None):
        ttl = self.client.keepalive(lease_id, timeout=timeout)
        if self.late:
            time.sleep(max(0.0, self.lease.deadline - time.monotonic()) + 0.05)
        return ttl


@needs_etcd
def test_renewal_answered_after_the_deadline_loses_the_lease(client):
    # Found by the fault suite: the agent fenced at the deadline and took a
    # new lease, while the old one, renewed by a late answer, kept the owner
    # key alive for nobody: the service stayed down everywhere.
    late = LateAnswers(client)
    lost = []
    lease = late.lease = host_lease(late, on_lost=lost.append)
    lease.grant()
    key = '/test/late-renewal'
    client.put(key, 'x', lease=lease.id)
    try:
        late.late = True
        began = time.monotonic()
        while not lost and time.monotonic() - began < TTL + RENEW:
            time.sleep(0.02)
        assert lost and 'after the self-fence deadline' in lost[0]
        assert not lease.valid
        renewals = lease.renewals
        # Never renewed again: its keys go with it, one TTL later at most.
        while client.get(key) is not None and \
                time.monotonic() - began < 2 * TTL + RENEW:
            time.sleep(0.1)
        assert client.get(key) is None
        assert lease.renewals == renewals
    finally:
        lease.stop()


class Blackout(object):
    """A client whose renewals fail while ``down`` is set, as through a cut
    link: etcd never sees them."""

    def __init__(self, client):
        self.client = client
        self.down = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def _cut(self, timeout):
        time.sleep(min(timeout or REQUEST, 0.05))
        raise EtcdError('link cut (test)')

    def keepalive(self, lease_id, timeout=None):
        if self.down:
            self._cut(timeout)
        return self.client.keepalive(lease_id, timeout=timeout)

    def keepalive_at(self, lease_id, endpoint, timeout):
        if self.down:
            self._cut(timeout)
        return self.client.keepalive_at(lease_id, endpoint, timeout)


# A suspension window wide enough for a test that cannot pick the moment of
# the cut within the renewal period: suspended 2.0 s after the last good
# renewal, killed 2.8 s after it.
WIDE = dict(renew=0.5, fence_margin=1.0, kill_margin=0.2)


def suspending_lease(client):
    """(lease, its link, [(time, event, args...)]): a lease granted through
    a link that the test cuts, with the wide suspension window."""
    events = []
    cut = Blackout(client)

    def note(what):
        return lambda *args: events.append((time.monotonic(), what) + args)
    lease = HostLease(cut, TTL, WIDE['renew'], RETRY, REQUEST,
                      WIDE['fence_margin'], kill_margin=WIDE['kill_margin'],
                      on_renewed=note('renewed'), on_lost=note('lost'),
                      on_suspended=note('suspended'),
                      on_resumed=note('resumed'))
    lease.grant()
    return lease, cut, events


def cut_after_a_renewal(lease, cut, events):
    """Cut the link just after a renewal; returns its send time's bound."""
    count = len(events)
    began = time.monotonic()
    while len(events) == count and time.monotonic() - began < 2:
        time.sleep(0.005)
    cut.down = True
    return events[-1][0]


@needs_etcd
def test_a_late_renewal_suspends_and_resumes_on_the_same_lease(client):
    lease, cut, events = suspending_lease(client)
    key = '/test/suspended-owner'
    client.put(key, 'hA', lease=lease.id)
    try:
        renewed = cut_after_a_renewal(lease, cut, events)
        time.sleep(TTL - WIDE['fence_margin'] + 0.2)  # past the deadline
        assert lease.state() == 'suspended' and not lease.valid
        assert [e[1] for e in events if e[0] > renewed] == ['suspended']
        cut.down = False
        began = time.monotonic()
        while lease.state() != 'valid' and time.monotonic() - began < 1:
            time.sleep(0.01)
        after = [e[1] for e in events if e[0] > renewed]
        assert after[:3] == ['suspended', 'renewed', 'resumed'], after
        assert lease.valid and lease.lost_reason is None
        # The same lease: the key on it never went away.
        assert client.get(key).value == 'hA'
        assert client.lease_ttl(lease.id) >= TTL - 1
    finally:
        lease.revoke()


@needs_etcd
def test_no_renewal_by_the_kill_deadline_loses_the_lease_before_etcd(client):
    lease, cut, events = suspending_lease(client)
    try:
        renewed = cut_after_a_renewal(lease, cut, events)
        began = time.monotonic()
        while lease.lost_reason is None and time.monotonic() - began < TTL:
            time.sleep(0.01)
        lost = [e for e in events if e[1] == 'lost']
        assert lost and 'kill deadline passed' in lost[0][2]
        assert [e[1] for e in events if e[0] > renewed] == [
            'suspended', 'lost']
        suspended_at = events[-2][0]
        # Suspended at the deadline, killed at the kill deadline: both
        # before etcd could expire the lease, a TTL after the send time
        # of the last renewal, which came before ``renewed``.
        assert suspended_at - renewed < TTL - WIDE['fence_margin'] + 0.1
        assert lost[0][0] - renewed < TTL - WIDE['kill_margin'] + 0.05
        assert lost[0][0] - suspended_at > 0.5
        assert lease.state() == 'lost'
    finally:
        lease.stop()


@needs_etcd
def test_ownership_tokens_and_guarded_writes(client):
    k = Keys('/test-ownership-%d' % os.getpid(), 'c')
    lease_a = host_lease(client)
    lease_b = host_lease(client)
    lease_a.grant()
    lease_b.grant()
    try:
        a = Ownership(client, k, 'web', 'hA')
        b = Ownership(client, k, 'web', 'hB')
        token_a = a.acquire(lease_a.id)
        assert token_a == client.get(k.owner('web')).create_revision
        assert b.acquire(lease_b.id) is None
        assert b.holder.value == 'hA'
        # A replayed acquire (answer lost) finds our own key: still ours.
        assert a.acquire(lease_a.id) == token_a
        assert a.write('state', 'running')
        assert not b.write('state', 'hijack', token=token_a + 1000)
        assert a.release()
        token_b = b.acquire(lease_b.id)
        assert token_b > token_a
        # The deposed owner's token no longer writes.
        assert not a.write('state', 'stale', token=token_a)
        assert client.get(k.service('web', 'state')).value == 'running'
        assert b.write('state', 'moved')
        # Membership lives and dies with the lease.
        m = Membership(client, k, 'hB')
        m.announce(lease_b.id, {'ok': True})
        assert m.alive() == {'hB': {'ok': True}}
        lease_b.revoke()
        assert m.alive() == {}
        assert client.get(k.owner('web')) is None
    finally:
        lease_a.revoke()
        lease_b.revoke()
        client.delete(k.root, prefix=True)


# -- the watchdog ------------------------------------------------------------

needs_cgroup = pytest.mark.skipif(
    cgroup2_mount() is None or os.geteuid() != 0,
    reason='needs root and a cgroup v2 hierarchy')


@pytest.fixture
def victim():
    """A cgroup with a process in it, as a service would have."""
    group = Cgroup(os.path.join(cgroup2_mount(), 'slaposha-test-%d'
                                % os.getpid())).create()
    proc = subprocess.Popen(group.wrap(['sleep', '300']))
    deadline = time.monotonic() + 5
    while not group.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield group, proc
    finally:
        group.kill()
        proc.wait()
        group.remove()


def wait_dead(proc, timeout):
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@needs_cgroup
def test_watchdog_fences_when_petting_stops(victim):
    group, proc = victim
    dog = Watchdog().start()
    try:
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # petted: nothing happens
            dog.arm(time.monotonic() + 0.3, [group.path])
            time.sleep(0.1)
        assert proc.poll() is None
        last = time.monotonic() + 0.3
        dog.arm(last, [group.path])
        assert wait_dead(proc, 2)
        assert time.monotonic() >= last
        assert group.pids() == []
    finally:
        dog.stop()


@needs_cgroup
def test_watchdog_fences_after_the_agent_died(victim):
    group, proc = victim
    dog = Watchdog().start()
    dog.arm(time.monotonic() + 0.5, [group.path])
    dog.proc.stdin.close()  # the agent is gone: no more pets
    assert wait_dead(proc, 3)
    assert dog.proc.wait(3) == 0


@needs_cgroup
def test_disarmed_watchdog_does_nothing(victim):
    group, proc = victim
    dog = Watchdog().start()
    try:
        dog.arm(time.monotonic() + 0.3, [group.path])
        dog.disarm()
        dog.proc.stdin.write(b'this is not json\n')
        dog.proc.stdin.flush()
        assert not wait_dead(proc, 0.8)
        assert dog.alive()
    finally:
        dog.stop()


@needs_etcd
def test_what_other_hosts_write_is_read_within_limits(client):
    """A membership value or a history record nested 5000 deep, or with a
    field of another type, is one line (before: a RecursionError in every
    agent's cycle, or a TypeError where the field was used)."""
    from slaposha import history
    k = Keys('/hostile', 'c1')
    client.put(k.host('hX'), '[' * 5000 + ']' * 5000)
    client.put(k.host('hY'), json.dumps({'failed': 5}))
    client.put(k.host('hZ'), json.dumps({'failed': ['web'], 'pid': 7}))
    alive = Membership(client, k, 'hA').alive()
    assert alive['hX'] == {'error': 'unreadable: membership of hX nests'
                           ' deeper than 32 levels'}
    assert alive['hY'] == {'error': 'unreadable: membership of hY: field'
                           ' failed must be an array of strings or null'
                           ' (got 5)'}
    assert alive['hZ'] == {'failed': ['web'], 'pid': 7}
    good = {'service': 'web', 'kind': 'switch', 'from': 'hA', 'to': 'hB',
            'token': 12, 'since': 1.0, 'running': 2.0, 'duration': 1.0,
            'by': 'operator alice'}
    records = [good, dict(good, running='soon'), dict(good, token=True)]
    for i, record in enumerate(records):
        client.put(k.history('web') + '%020d' % i,
                   json.dumps(record))
    client.put(k.history('web') + '%020d' % 9, '{"a":' * 5000)
    assert history.read(client, k, 'web') == [good]


@needs_cgroup
def test_a_frozen_cgroup_keeps_its_processes_and_still_dies_by_kill(victim):
    group, proc = victim
    pids = group.pids()
    assert group.freeze()
    assert group.frozen()
    time.sleep(0.3)
    assert group.pids() == pids and proc.poll() is None
    assert group.thaw() and not group.frozen()
    assert group.freeze()
    # SIGKILL through cgroup.kill reaches a frozen process, and the empty
    # group is thawed: what joins it later runs.
    assert group.kill(timeout=2) == len(pids)
    assert wait_dead(proc, 2)
    assert not group.frozen()
    late = subprocess.Popen(group.wrap(['sleep', '300']))
    try:
        deadline = time.monotonic() + 2
        while not group.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not group.frozen()
    finally:
        late.kill()
        late.wait()


@needs_cgroup
def test_watchdog_kills_a_suspended_service(victim):
    # The agent froze the service at its deadline, then stopped petting:
    # the watchdog's kill at the kill deadline reaches frozen processes.
    group, proc = victim
    assert group.freeze()
    dog = Watchdog().start()
    try:
        dog.arm(time.monotonic() + 0.3, [group.path])
        assert wait_dead(proc, 2)
        # Thawed by the watchdog once empty, a moment after the death.
        until = time.monotonic() + 1
        while group.frozen() and time.monotonic() < until:
            time.sleep(0.01)
        assert group.pids() == [] and not group.frozen()
    finally:
        dog.stop()
