"""The etcd client against real etcd members on 127.0.0.1.

One member (Debian's default timings) serves most tests; a three-member
cluster with fast elections serves the fail-over test. Every member is started
here on free ports in a temporary directory and stopped by its PID, also when
a test fails. Dead endpoints are a closed port (refuses at once) and a
listening socket that never answers (times out).
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from slaposha.cluster.etcd import (
    Client, Compare, EtcdRequestError, EtcdUnavailable, KeyValue, LeaseNotFound,
    Op, WatchCanceled, parse_version)
from slaposha.lab.cluster import LAB_ETCD

# The lab's etcd (3.5, fetched by tools/setup.sh), as the agents run it.
ETCD = LAB_ETCD if os.access(LAB_ETCD, os.X_OK) else None
needs_etcd = pytest.mark.skipif(
    ETCD is None, reason='no %s: run tools/setup.sh; these tests run real'
    ' etcd members' % LAB_ETCD)

# Elections in about 0.5 s instead of 1 s, for the fail-over test; with these
# the smallest lease etcd grants is 1 s instead of 2 s.
FAST_ELECTIONS = ['--heartbeat-interval', '50', '--election-timeout', '500']


# -- real etcd members ----------------------------------------------------------

def free_ports(count):
    """Ports nobody listens on now (all bound at once, so all different)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(('127.0.0.1', 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Member:
    """One etcd process, stopped by its PID."""

    def __init__(self, name, directory, client_port, peer_port):
        self.name = name
        self.directory = directory
        self.url = 'http://127.0.0.1:%d' % client_port
        self.peer_url = 'http://127.0.0.1:%d' % peer_port
        self.log_path = os.path.join(directory, '%s.log' % name)
        self.process = None

    def start(self, initial_cluster, token, extra):
        # ETCD_* variables of the caller's environment would override flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith('ETCD')}
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen(
                [ETCD, '--name', self.name,
                 '--data-dir', os.path.join(self.directory, self.name),
                 '--listen-client-urls', self.url,
                 '--advertise-client-urls', self.url,
                 '--listen-peer-urls', self.peer_url,
                 '--initial-advertise-peer-urls', self.peer_url,
                 '--initial-cluster', initial_cluster,
                 '--initial-cluster-token', token,
                 '--initial-cluster-state', 'new',
                 '--logger', 'zap', '--log-outputs', 'stderr'] + extra,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env)

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def kill(self):
        """A crash: SIGKILL, nothing flushed, connections cut."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def stop(self):
        if not self.alive():
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self):
        with open(self.log_path, 'rb') as log:
            return log.read()[-2000:].decode('utf-8', 'replace')


def wait_healthy(member, deadline):
    """Wait until ``member`` says it is healthy (a leader elected), or fail
    the test at ``deadline`` (monotonic) with the end of its log."""
    while True:
        if not member.alive():
            pytest.fail('etcd %s exited:\n%s' % (member.name, member.log_tail()))
        try:
            if requests.get(member.url + '/health', timeout=0.5).json().get(
                    'health') == 'true':
                return
        except (requests.RequestException, ValueError):
            pass
        if time.monotonic() > deadline:
            pytest.fail('etcd %s not healthy in time:\n%s'
                        % (member.name, member.log_tail()))
        time.sleep(0.05)


@contextlib.contextmanager
def etcd_cluster(directory, size, extra=()):
    """``size`` members on 127.0.0.1, healthy (a leader elected) on entry."""
    ports = free_ports(2 * size)
    members = [Member('m%d' % i, str(directory), ports[2 * i], ports[2 * i + 1])
               for i in range(size)]
    initial_cluster = ','.join('%s=%s' % (m.name, m.peer_url) for m in members)
    try:
        for member in members:
            member.start(initial_cluster, 'slaposha-test-%d' % ports[0], list(extra))
        deadline = time.monotonic() + 15
        for member in members:
            wait_healthy(member, deadline)
        yield members
    finally:
        for member in members:
            member.stop()


@pytest.fixture(scope='module')
def etcd(tmp_path_factory):
    """URL of one etcd member with Debian's default timings."""
    if ETCD is None:
        pytest.skip('no etcd binary')
    with etcd_cluster(tmp_path_factory.mktemp('etcd'), 1) as members:
        yield members[0].url


@pytest.fixture
def client(etcd):
    client = Client([etcd], timeout=3)
    yield client
    client.close()


@pytest.fixture
def closed_url():
    """An endpoint that refuses connections at once."""
    return 'http://127.0.0.1:%d' % free_ports(1)[0]


@pytest.fixture
def silent_url():
    """An endpoint that accepts connections (kernel backlog) and never answers,
    like a frozen or black-holed member."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    sock.listen(64)
    try:
        yield 'http://127.0.0.1:%d' % sock.getsockname()[1]
    finally:
        sock.close()


def watcher_count(url):
    """Watchers etcd holds now, from its own metrics."""
    metrics = requests.get(url + '/metrics', timeout=1).text
    return int(re.search(r'^etcd_debugging_mvcc_watcher_total (\d+)', metrics,
                         re.MULTILINE).group(1))


# -- keys -------------------------------------------------------------------------

@needs_etcd
def test_put_get_delete_round_trip_with_non_ascii_text(client):
    key, value = '/slaposha-test/rt/clé-ß', 'données ✓ — 日本語'
    revision = client.put(key, value)
    assert client.get(key) == KeyValue(key, value, revision, revision, 1, 0)

    second = client.put(key, 'deux')
    assert second > revision
    kv = client.get(key)
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (
        'deux', revision, second, 2)

    assert client.delete(key) == 1
    assert client.get(key) is None
    assert client.delete(key) == 0


@needs_etcd
def test_prefix_reads_only_keys_under_the_prefix(client):
    base = '/slaposha-test/prefix/'
    # 'a0' sorts right after every 'a/...' key ('0' follows '/'): the range
    # must stop before it.
    for name in ('a/2', 'a/1', 'a/3', 'a0', 'b'):
        last = client.put(base + name, name)
    assert [kv.key for kv in client.get_prefix(base + 'a/')] == [
        base + 'a/1', base + 'a/2', base + 'a/3']
    result = client.range(base, prefix=True)
    assert result.count == 5 and result.revision >= last
    assert client.delete(base + 'a/', prefix=True) == 3
    assert [kv.value for kv in client.get_prefix(base)] == ['a0', 'b']


@needs_etcd
def test_revision_follows_writes(client):
    before = client.revision()
    written = client.put('/slaposha-test/revision', 'x')
    assert written == before + 1
    assert client.revision() == written


# -- transactions ------------------------------------------------------------------

@needs_etcd
def test_create_txn_succeeds_once_and_loser_sees_the_owner(client):
    key = '/slaposha-test/txn/owner'

    def contend(host):
        return client.txn([Compare.create_revision(key, '==', 0)],
                          [Op.put(key, host)], [Op.range(key)])

    won = contend('host-a')
    assert won.succeeded
    token = won.revision
    assert won.responses == [token]

    lost = contend('host-b')
    assert not lost.succeeded
    [owner] = lost.responses[0]
    assert (owner.value, owner.create_revision) == ('host-a', token)
    assert client.get(key).value == 'host-a'


@needs_etcd
def test_stale_fencing_token_is_refused_after_key_recreated(client):
    lock, state = '/slaposha-test/fence/lock', '/slaposha-test/fence/state'
    create = [Compare.create_revision(lock, '==', 0)]
    token = client.txn(create, [Op.put(lock, 'host-a')]).revision

    def write_as_owner(value):
        return client.txn([Compare.create_revision(lock, '==', token)],
                          [Op.put(state, value)])

    assert write_as_owner('by a, owner').succeeded
    client.delete(lock)
    taken = client.txn(create, [Op.put(lock, 'host-b')])
    assert taken.succeeded and taken.revision > token
    assert not write_as_owner('by a, deposed').succeeded
    assert client.get(state).value == 'by a, owner'


@needs_etcd
def test_compare_operators_and_op_responses(client):
    key = '/slaposha-test/compare/k'
    revision = client.put(key, 'b')
    cases = [
        (Compare.version(key, '==', 1), True),
        (Compare.version(key, '>', 1), False),
        (Compare.mod_revision(key, '<', revision + 1), True),
        (Compare.mod_revision(key, '!=', revision), False),
        (Compare.value(key, '>', 'a'), True),
        (Compare.value(key, '<', 'a'), False),
        (Compare.value(key, '==', 'b'), True),
        (Compare.create_revision(key, '==', revision), True),
    ]
    assert [client.txn([compare]).succeeded for compare, _ in cases] == [
        expected for _, expected in cases]
    with pytest.raises(ValueError):
        Compare.version(key, '>=', 1)

    other = '/slaposha-test/compare/other'
    client.put(other, 'gone soon')
    result = client.txn([], [Op.put(key + '2', 'c'), Op.range(key), Op.delete(other)])
    put_revision, [kv], deleted = result.responses
    assert result.succeeded and put_revision == result.revision
    assert (kv.key, kv.value, deleted) == (key, 'b', 1)


@needs_etcd
def test_refused_request_is_definitive_and_not_retried_elsewhere(etcd, closed_url):
    client = Client([etcd, closed_url], retry_interval=0.2)
    start = time.monotonic()
    with pytest.raises(EtcdRequestError) as info:
        client.put('', 'no key', timeout=2)
    assert time.monotonic() - start < 0.2
    assert not isinstance(info.value, EtcdUnavailable)
    assert info.value.code == 3 and info.value.http_status == 400
    assert etcd in str(info.value) and 'kv/put' in str(info.value)
    assert 'key is not provided' in str(info.value)
    assert client.endpoint == etcd


# -- leases ------------------------------------------------------------------------

@needs_etcd
def test_grant_reports_the_ttl_etcd_raised_to_its_minimum(client):
    # With the default 1 s election timeout etcd grants 1.5 s rounded up.
    lease = client.grant(1)
    assert lease.ttl == 2
    assert client.keepalive(lease.id) == 2
    client.revoke(lease.id)


@needs_etcd
def test_keepalive_returns_ttl_and_fails_after_revoke(client):
    lease = client.grant(3)
    assert lease.ttl == 3
    assert client.keepalive(lease.id) == 3
    assert 1 <= client.lease_ttl(lease.id) <= 3
    key = '/slaposha-test/lease/revoked'
    client.put(key, 'x', lease=lease.id)

    client.revoke(lease.id)
    assert client.get(key) is None
    for call in (client.keepalive, client.revoke, client.lease_ttl):
        with pytest.raises(LeaseNotFound) as info:
            call(lease.id)
        assert info.value.lease_id == lease.id
        assert '%x' % lease.id in str(info.value)
    with pytest.raises(LeaseNotFound):
        client.put(key, 'x', lease=lease.id)


@needs_etcd
def test_key_on_a_lease_disappears_when_the_lease_expires(client):
    key = '/slaposha-test/lease/expiring'
    start = time.monotonic()
    lease = client.grant(1)
    client.put(key, 'owner', lease=lease.id)
    assert client.get(key).lease == lease.id
    while client.get(key) is not None and time.monotonic() - start < lease.ttl + 3:
        time.sleep(0.05)
    gone_after = time.monotonic() - start
    assert client.get(key) is None
    # Not before the TTL granted; at most one 0.5 s expiry scan later (+ slack).
    assert lease.ttl - 0.05 <= gone_after <= lease.ttl + 1.5
    with pytest.raises(LeaseNotFound):
        client.keepalive(lease.id)


# -- watch --------------------------------------------------------------------------

@needs_etcd
def test_watch_yields_put_then_delete(client):
    key = '/slaposha-test/watch/one'
    start = client.revision() + 1
    client.put(key, 'v1')
    client.put('/slaposha-test/watch/other', 'not watched')
    client.delete(key)
    with contextlib.closing(client.watch(key, start_revision=start, timeout=2)) as events:
        put, delete = next(events), next(events)
    assert (put.type, put.key, put.value) == ('PUT', key, 'v1')
    assert put.create_revision == put.mod_revision == start
    assert (delete.type, delete.key, delete.value) == ('DELETE', key, '')
    assert delete.mod_revision == start + 2


@needs_etcd
def test_watch_prefix_sees_changes_as_they_happen_and_ends_at_timeout(client):
    prefix = '/slaposha-test/watch/live/'
    start = client.revision() + 1
    written = {}

    def write_later():
        time.sleep(0.5)
        for name in ('a', 'b'):
            written[name] = time.monotonic()
            client.put(prefix + name, name)
        client.put('/slaposha-test/watch/elsewhere', 'not watched')

    writer = threading.Thread(target=write_later)
    began = time.monotonic()
    writer.start()
    seen = []
    for event in client.watch(prefix, start_revision=start, timeout=1.0, prefix=True):
        seen.append((event, time.monotonic()))
    ended = time.monotonic() - began
    writer.join()
    assert [(e.type, e.key) for e, _ in seen] == [
        ('PUT', prefix + 'a'), ('PUT', prefix + 'b')]
    assert all(at - written[e.value] < 0.3 for e, at in seen)
    # The deadline holds even after events reset the socket's read timer
    # (which would end this watch 0.5 s late).
    assert 0.95 <= ended <= 1.2


@needs_etcd
def test_closing_a_watch_ends_it_in_etcd(client, etcd):
    key = '/slaposha-test/watch/close'

    def settles_at(count):
        # etcd lowers its gauge a moment after a stream is gone.
        deadline = time.monotonic() + 2
        while watcher_count(etcd) != count and time.monotonic() < deadline:
            time.sleep(0.05)
        return watcher_count(etcd) == count

    # Every watch of the tests before this one is over: none left behind.
    assert settles_at(0)
    revision = client.put(key, 'x')
    events = client.watch(key, start_revision=revision, timeout=10)
    assert next(events).value == 'x'
    assert watcher_count(etcd) == 1
    events.close()
    assert settles_at(0)


@needs_etcd
def test_closing_the_client_ends_a_watch_in_progress(etcd):
    client = Client([etcd], timeout=3)
    watch = client.watch('/slaposha-test/watch/closed', timeout=10)
    ended = []

    def follow():
        ended.append(list(watch))
        ended.append(time.monotonic())
    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.5)  # watching, blocked in a read
    closed = time.monotonic()
    client.close()
    thread.join(5)
    assert not thread.is_alive()
    assert ended[0] == [] and ended[1] - closed < 1


@needs_etcd
def test_watch_from_a_compacted_revision_is_canceled(client, etcd):
    key = '/slaposha-test/watch/compacted'
    old = client.put(key, 'old')
    new = client.put(key, 'new')
    requests.post(etcd + '/v3/kv/compaction', json={'revision': str(new)},
                  timeout=2).raise_for_status()
    with pytest.raises(WatchCanceled) as info:
        list(client.watch(key, start_revision=old, timeout=2))
    assert info.value.compact_revision == new


@needs_etcd
def test_watch_of_a_range_gives_a_revision_in_one_batch(client):
    base = '/slaposha-test/range/'
    start = client.revision() + 1
    client.txn([], success=[Op.put(base + 'b', '1'), Op.put(base + 'c', '2'),
                            Op.put(base + 'd', 'out of range')])
    client.put(base + 'a', 'out of range')
    client.delete(base + 'c')
    seen = []
    with contextlib.closing(client.watch(base + 'b', range_end=base + 'd',
                                         start_revision=start, timeout=1,
                                         batches=True)) as batches:
        for batch in batches:
            seen.append([(e.type, e.key, e.mod_revision) for e in batch])
    flat = [event for batch in seen for event in batch]
    assert flat == [('PUT', base + 'b', start), ('PUT', base + 'c', start),
                    ('DELETE', base + 'c', start + 2)]
    # The txn's two changes came together: a cache never shows one alone.
    assert any(batch[:2] == flat[:2] for batch in seen)


@needs_etcd
def test_last_change_is_the_revision_of_this_clients_last_write(etcd):
    client = Client([etcd], timeout=3)
    other = Client([etcd], timeout=3)
    key = '/slaposha-test/last-change'
    assert client.last_change == 0
    written = client.put(key, 'x')
    assert client.last_change == written
    other.put(key, 'by another client')
    client.get(key)
    client.delete(key + '/none')  # deletes nothing: no change
    client.txn([Compare.version(key, '==', 0)], success=[Op.put(key, 'y')],
               failure=[Op.range(key)])  # the failure branch only reads
    assert client.last_change == written
    result = client.txn([], success=[Op.put(key, 'z')])
    assert client.last_change == result.revision > written
    assert client.delete(key) == 1
    assert client.last_change == client.revision()


@needs_etcd
def test_watch_leaves_an_endpoint_that_does_not_confirm_it(etcd, silent_url):
    key = '/slaposha-test/watch/confirm'
    revision = Client([etcd]).put(key, 'x')
    client = Client([silent_url, etcd], request_timeout=0.3, retry_interval=0.1)
    began = time.monotonic()
    with contextlib.closing(client.watch(key, start_revision=revision,
                                         timeout=5)) as events:
        assert next(events).value == 'x'
    # One request timeout lost on the silent endpoint, not the watch's 5 s.
    assert time.monotonic() - began < 1.5
    assert client.endpoint == etcd


# -- cluster ----------------------------------------------------------------------

@needs_etcd
def test_status_and_members(client, etcd):
    status = client.status()
    assert re.match(r'^\d+\.\d+\.\d+', status.version)
    assert parse_version(status.version) >= (3, 4, 0)
    assert status.endpoint == etcd
    assert status.is_leader and status.raft_term >= 1 and status.revision >= 1
    [member] = client.members()
    assert member.id == status.member_id
    assert member.client_urls == [etcd] and not member.is_learner


def test_parse_version():
    assert parse_version('3.4.23') == (3, 4, 23)
    assert parse_version('v3.5.16') == (3, 5, 16)
    assert parse_version('3.6.0-rc.1') == (3, 6, 0)
    assert parse_version('3.5') == (3, 5, 0)
    assert parse_version('3.4.23') < parse_version('3.5.13')
    with pytest.raises(ValueError):
        parse_version('etcd')


# -- endpoints that do not answer -------------------------------------------------

@needs_etcd
def test_fails_over_at_once_and_remembers_the_endpoint_that_answered(
        etcd, closed_url, silent_url):
    refused = Client([closed_url, etcd], retry_interval=0.2)
    start = time.monotonic()
    refused.put('/slaposha-test/failover', 'x')
    assert time.monotonic() - start < 0.2  # no pause before the next endpoint
    assert refused.endpoint == etcd
    refused.prefer_first()  # e.g. an agent's own member, back again
    assert refused.endpoint == closed_url

    frozen = Client([silent_url, etcd], request_timeout=0.3, retry_interval=0.2)
    start = time.monotonic()
    assert frozen.get('/slaposha-test/failover').value == 'x'
    assert 0.25 <= time.monotonic() - start < 0.5  # one request timeout lost
    assert frozen.endpoint == etcd
    start = time.monotonic()
    frozen.get('/slaposha-test/failover')
    assert time.monotonic() - start < 0.25  # the frozen one (0.3 s) is not tried first


def test_all_endpoints_dead_raise_unavailable_within_the_timeout(closed_url, silent_url):
    client = Client([closed_url, silent_url], request_timeout=0.3, retry_interval=0.2)
    start = time.monotonic()
    with pytest.raises(EtcdUnavailable) as info:
        client.put('/slaposha-test/dead', 'x', timeout=1.0)
    elapsed = time.monotonic() - start
    # It kept trying until close to the deadline, and not past it.
    assert 1.0 - 0.2 - 0.1 <= elapsed <= 1.0 + 0.1
    message = str(info.value)
    assert closed_url in message and silent_url in message and 'kv/put' in message
    assert '\n' not in message

    # What an owner does with the little time it has left.
    start = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        client.keepalive(1234, timeout=0.4)
    assert time.monotonic() - start <= 0.5
    start = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        list(client.watch('/slaposha-test/dead', timeout=0.5))
    assert time.monotonic() - start <= 0.6


@needs_etcd
def test_cluster_keeps_serving_when_the_member_in_use_dies(tmp_path):
    with etcd_cluster(tmp_path, 3, FAST_ELECTIONS) as members:
        urls = [member.url for member in members]
        client = Client(urls, timeout=3)
        dead_id = client.status(urls[0]).member_id
        key = '/slaposha-test/cluster/owner'
        lease = client.grant(3)
        first = client.put(key, 'v1', lease=lease.id)
        assert client.endpoint == urls[0]
        watch = client.watch(key, start_revision=first, timeout=8)
        with contextlib.closing(watch) as events:
            assert next(events).value == 'v1'  # watching through member 0

            members[0].kill()
            start = time.monotonic()
            client.put(key, 'v2', lease=lease.id)
            assert time.monotonic() - start < 3
            assert client.endpoint in urls[1:]
            assert client.keepalive(lease.id) == 3
            client.put(key, 'v3', lease=lease.id)

            # The watch resumes on a live member after v1: nothing lost or repeated.
            assert [next(events).value, next(events).value] == ['v2', 'v3']

        leaders = {client.status(url).leader for url in urls[1:]}
        assert len(leaders) == 1 and dead_id not in leaders
        assert {m.id for m in client.members()} >= {dead_id}  # killed, not removed

        # The last member left has no leader: etcd ends the watch on it
        # (else it would wait in silence until its deadline), and with
        # patience the watcher hears of it instead of waiting either.
        watch = client.watch(key, start_revision=first, timeout=20,
                             patience=1.0)
        with contextlib.closing(watch) as events:
            assert next(events).value == 'v1'
            alone = client.endpoint
            for member in members:
                if member.url != alone:
                    member.kill()
            killed = time.monotonic()
            with pytest.raises(EtcdUnavailable) as info:
                list(events)
        assert time.monotonic() - killed < 8
        assert 'no leader' in str(info.value) or 'refused' in str(info.value)
