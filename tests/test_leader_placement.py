"""[etcd] leader_placement = away moves etcd's raft leadership off the hosts
that own services; a new leader gives every lease its whole TTL again, so a
move within a TTL of an owner's crash delays that owner's takeover by up to a
TTL (benchmarks/RESULTS.md, scale: one crash in five 3 s slower). The agent
first looks at the other owners' leases on a real etcd member: one renewed
on schedule lets the move go on, one whose holder stopped renewing (or that
just ended) postpones it."""

import threading
import time
from types import SimpleNamespace

import pytest

from slaposha.agent import Agent
from slaposha.cluster.etcd import Client, KeyValue
from slaposha.intents import View

from test_etcd_client import ETCD, etcd_cluster

pytestmark = pytest.mark.skipif(ETCD is None, reason='no lab etcd')


def owned(service, host, lease_id):
    return View(service, owner=KeyValue('/owner/' + service, host, 1, 1, 1,
                                        lease_id))


def test_leadership_stays_while_another_owners_lease_runs_out(tmp_path):
    with etcd_cluster(tmp_path, 1) as members:
        client = Client([members[0].url], timeout=3)
        agent = SimpleNamespace(host='hC', client=client, cluster=(
            SimpleNamespace(lease=SimpleNamespace(ttl=3, renew_interval=1.0))))
        renewed = client.grant(3).id     # hA renews it every second
        stop = threading.Event()

        def renew():
            while not stop.wait(1.0):
                client.keepalive(renewed)
        thread = threading.Thread(target=renew, daemon=True)
        thread.start()
        try:
            views = {'web': owned('web', 'hA', renewed),
                     'own': owned('own', 'hC', 0)}
            # Renewed on schedule: the move may go on (but for the instant
            # just before a renewal, when it waits for the next check).
            said = []
            for _ in range(25):
                said.append(Agent._owner_not_renewing(agent, views))
                time.sleep(0.1)
            assert said.count(None) >= 22, said
            crashed = client.grant(3).id     # hB dies just after this
            views['db'] = owned('db', 'hB', crashed)
            # It cannot be told from a lease renewed on schedule at once:
            # from at most ceil(renew_interval) on.
            deadline = time.monotonic() + 1.5
            while Agent._owner_not_renewing(agent, views) is None:
                assert time.monotonic() < deadline, 'never postponed'
                time.sleep(0.05)
            assert Agent._owner_not_renewing(agent, views) == (
                "hB's lease has 1 s left (renewed on schedule: 2 or more)")
            client.revoke(crashed)
            assert Agent._owner_not_renewing(agent, views) == (
                "hB's lease just ended")
        finally:
            stop.set()
            thread.join(5)
            client.close()
