"""The agent's view of the cluster, followed by an etcd watch
(slaposha.cluster.watch), against a real etcd member on 127.0.0.1: a change
is seen at once and whole, the agent's own writes are never missing from
what it reads, a compacted watch is replaced by a full read, a broken one
says so."""

import contextlib
import threading
import time

import pytest
import requests

from slaposha.cluster.etcd import Client, EtcdError
from slaposha.cluster.keys import Keys
from slaposha.cluster.watch import ClusterWatch

from test_etcd_client import etcd_cluster, needs_etcd, wait_healthy

pytestmark = needs_etcd


@contextlib.contextmanager
def following(url, name, **client_options):
    """A started ClusterWatch of cluster ``name``, with the Event its
    changes set."""
    options = dict(timeout=1.0, request_timeout=0.5, retry_interval=0.2)
    options.update(client_options)
    changed = threading.Event()
    world = ClusterWatch(Client([url], **options), Keys('/slaposha-test', name),
                         resync_interval=30, on_change=changed.set)
    world.changed = changed
    world.start()
    try:
        deadline = time.monotonic() + 10
        while world.problem and time.monotonic() < deadline:
            time.sleep(0.02)
        assert world.problem is None
        # The first read's own notice, before the test waits for others'.
        assert changed.wait(5)
        yield world
    finally:
        world.stop()


def test_follows_hosts_and_services_and_sees_a_lost_lease_whole(tmp_path):
    with etcd_cluster(tmp_path, 1) as members:
        url = members[0].url
        client = Client([url], timeout=3)
        keys = Keys('/slaposha-test', 'one')
        lease = client.grant(5)
        client.put(keys.host('hA'), '{"pid": 1}', lease=lease.id)
        token = client.put(keys.owner('web'), 'hA', lease=lease.id)
        client.put(keys.service('web', 'target'), '{"state": "started"}')
        with following(url, 'one') as world:
            views, alive = world.read()
            assert views['web'].owner.value == 'hA'
            assert views['web'].owner.create_revision == token
            assert views['web'].target == {'state': 'started'}
            assert alive == {'hA': {'pid': 1}}

            # The lease ends: its host and owner keys go in one revision,
            # and a reader never sees one without the other.
            seen = []
            stop = threading.Event()

            def reader():
                while not stop.is_set():
                    views, alive = world.read()
                    seen.append(('hA' in alive, views['web'].owner is not None))
                    time.sleep(0.001)
            thread = threading.Thread(target=reader)
            thread.start()
            world.changed.clear()
            client.revoke(lease.id)
            revoked = time.monotonic()
            assert world.changed.wait(2)
            woken = time.monotonic() - revoked
            time.sleep(0.2)
            stop.set()
            thread.join()
            views, alive = world.read()
            assert views['web'].owner is None and alive == {}
            assert set(seen) == {(True, True), (False, False)}
            assert woken < 0.5, woken  # milliseconds, unless the machine is loaded

            # history/ is not followed: it grows with every takeover.
            world.changed.clear()
            client.put(keys.root + 'history/web/1', '{}')
            assert not world.changed.wait(0.3)
            assert world.reloads == 1  # no full read at rest


def test_reads_are_never_older_than_our_own_writes(tmp_path):
    with etcd_cluster(tmp_path, 1) as members:
        url = members[0].url
        loop = Client([url], timeout=3)
        keys = Keys('/slaposha-test', 'two')
        with following(url, 'two') as world:
            for n in range(20):
                loop.put(keys.service('web', 'target'),
                         '{"state": "started", "by": "op%d"}' % n)
                views, _ = world.read(at_least=loop.last_change)
                assert views['web'].target == {'state': 'started',
                                               'by': 'op%d' % n}
            assert world.reloads == 1
            # A write out of the watched keys is never brought by the
            # watch: the read waits a little, then reads.
            loop.put(keys.root + 'history/web/1', '{}')
            began = time.monotonic()
            world.read(at_least=loop.last_change, catch_up=0.2)
            assert 0.15 < time.monotonic() - began < 2
            assert world.reloads == 2

            # etcd gone: the watch says so within its client's timeout, and
            # reads fail in one line instead of returning an old view.
            members[0].kill()
            deadline = time.monotonic() + 10
            while not world.problem and time.monotonic() < deadline:
                time.sleep(0.05)
            assert world.problem and '\n' not in world.problem
            with pytest.raises(EtcdError):
                world.read()


def test_a_watch_resumed_from_a_compacted_revision_reads_again(tmp_path):
    with etcd_cluster(tmp_path, 1) as members:
        member = members[0]
        client = Client([member.url], timeout=3)
        keys = Keys('/slaposha-test', 'three')
        client.put(keys.service('web', 'target'), '{"state": "stopped"}')
        # A long pause between tries: the member comes back and its history
        # is compacted before the watch resumes from its old revision.
        with following(member.url, 'three', timeout=6.0,
                       retry_interval=4.0) as world:
            member.kill()
            member.start('%s=%s' % (member.name, member.peer_url), 'again', [])
            wait_healthy(member, time.monotonic() + 15)
            client.put(keys.service('web', 'target'), '{"state": "started"}')
            latest = client.put(keys.service('web', 'frozen'), '{}')
            requests.post(member.url + '/v3/kv/compaction',
                          json={'revision': str(latest)},
                          timeout=2).raise_for_status()
            deadline = time.monotonic() + 15
            while world.revision < latest and time.monotonic() < deadline:
                time.sleep(0.05)
            assert world.reloads == 2  # the first read, then after the cancel
            views, _ = world.read()
            assert views['web'].target == {'state': 'started'}
            assert views['web'].frozen == {}

