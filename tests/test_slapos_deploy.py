"""A SlapOS node deployed by SlapOS itself and protected by the agents.

The real slapproxy master, the real `slapos node format`, `slapos node
software` and `slapos node instance` (buildout running as the partition's
user) deploy recordstore, a small software release whose partition stores
what it is sent (tests/sr). instance_root is a btrfs subvolume that
the ``btrfs`` driver replicates; the agents move the node between two hosts
(a witness makes the quorum) and the partition must answer on the same
address from the peer with every record it had acknowledged, without any
buildout there."""

import os
import subprocess
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.lab.slapos import (
    BTRFS_PATHS, NODE, btrfs_srv, buildout_facts, deploy_node, node_install,
    node_service, post_record, post_records, records, route_partitions,
    slapgrid)

pytestmark = pytest.mark.lab

pytest.importorskip('slapos.grid.svcbackend',
                    reason='slapos.core is not installed')

INTERVAL = 0.5
SERVICE = node_service(INTERVAL)
PART = '/srv/slapgrid/slappart0'
facts = buildout_facts


def write(lab, first, count):
    """Post records first..first+count-1; returns them, all acknowledged."""
    sent = ['record-%d' % n for n in range(first, first + count)]
    assert post_records(lab, sent) == sent
    return sent


def answering(lab, lc, host):
    """Wait for the partition to answer (from ``host``); on failure show
    what ``host``'s agent says."""
    try:
        return wait_for(lambda: records(lab) is not None, 30, interval=0.1,
                        what='the partition answering from %s' % host)
    except Exception:
        print(lc.cli(host, 'status', check=False).stdout)
        with open(os.path.join(lab[host].root, 'log', 'agent.log'),
                  errors='replace') as f:
            print(''.join(f.readlines()[-40:]))
        raise


def takeover(lab, lc, crash, peer, acked, before, note=''):
    """Crash ``crash``; the partition must answer from ``peer`` with every
    acknowledged record and no buildout run there."""
    lab.crash(crash)
    crashed = time.monotonic()
    answering(lab, lc, peer)
    took = time.monotonic() - crashed
    got = records(lab)
    assert lc.owner('node', 'hW')[0] == peer
    assert got[:len(acked)] == acked, 'acknowledged records lost: %s' % (
        sorted(set(acked) - set(got)))
    # No buildout ran there: what it would rewrite is as first deployed.
    assert facts(lab, peer) == before
    print('\npartition answered from %s %.2f s after %s crashed%s, with its'
          ' %d acknowledged records' % (peer, took, crash, note, len(acked)))


def test_slapgrid_deployed_partition_moves_with_its_data(make_lab):
    lab = make_lab(['hA', 'hB', 'hW', 'hM', 'hO'], paths=BTRFS_PATHS,
                   shared={NODE: node_install()})
    btrfs_srv(lab, ['hA', 'hB'])
    proxy = deploy_node(lab, 'hA', 'hM', others=('hB',))
    route_partitions(lab['hO'])
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'node': SERVICE}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        wait_for(lambda: post_record(lab, 'record-0'), 30,
                 what='the partition storing records on hA')
        # The instance supervisord that slapgrid started was adopted into
        # the service's cgroup: a fence reaches it and its programs.
        adopted = lab['hA'].run(
            'cat /proc/$(cat /srv/slapgrid/var/run/supervisord.pid)/cgroup'
        ).stdout
        assert '/slaposha/node/slapos.node' in adopted, adopted
        # hB has no software release at first: not eligible until the
        # owner copied it (and the identity went with the data).
        lc.wait_standby('hB', 'btrfs#slapgrid')
        acked = ['record-0'] + write(lab, 1, 20)
        before = facts(lab, 'hA')
        # Acknowledged records reach the standby with the next snapshot.
        time.sleep(4 * INTERVAL)

        # 1. The owner crashes with the master up.
        takeover(lab, lc, 'hA', 'hB', acked, before)
        # The software release was copied, not built, and the node's
        # identity came with the data.
        sr = lab['hB'].run('ls /opt/slapgrid/*/.completed /opt/slapgrid/*/'
                           '.installed.cfg /etc/opt/slapos/slapos.xml').stdout
        assert sr.count('/opt/slapgrid/') == 2, sr
        # slapgrid's next run on the new owner (a task of the service)
        # finds the partition up to date: no buildout either.
        slapgrid(lab['hB'], 'node', 'instance')
        assert facts(lab, 'hB') == before
        acked += write(lab, 21, 10)

        # 2. hA comes back as the standby: resynchronised from hB.
        lab.restart('hA')
        lc.start_agent('hA')

        lc.wait_standby('hA', 'btrfs#slapgrid')
        acked += write(lab, 31, 5)
        time.sleep(4 * INTERVAL)

        # 3. The master is gone, then hB crashes: hA needs nothing from it.
        proxy.terminate()
        proxy.wait(10)
        takeover(lab, lc, 'hB', 'hA', acked, before, ' (master stopped)')
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
        proxy.terminate()
