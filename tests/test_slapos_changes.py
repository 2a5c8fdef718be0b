"""A SlapOS node that changes while the agents keep it (DESIGN.md 6).

SlapOS itself deploys recordstore on hA (the real slapproxy, `slapos node
format`, `software` and `instance`), the agents take the node under their
care (btrfs replication to hB), then the node changes as SlapOS changes it,
and each change is followed:

1. a second software release and two partitions on it are added by
   `slapos node software` and `instance` after hB joined, while hB cannot
   receive copies: the owner publishes the change, hB becomes ineligible
   naming the release's URL, the owner's status shows the failed copy with
   its error and age, and once hB can receive again the copy is retried by
   itself and hB is eligible again;
2. the release deleted on hB comes back by itself;
3. a partition's folder is moved away on the owner, then the owner
   crashes: on hB every other partition answers (the first with every
   acknowledged record, the new ones too), status names the broken one as
   set aside and the node as degraded; once its folder is back it starts
   by itself in the running supervisord, the others untouched; `slapos node format` run by hB keeps the
   computer's address on the master (it moved with the node);
4. a partition destroyed by SlapOS (`slapos node instance` and `report`
   on hB) drops out of `slaposha slapos partitions` at once.
"""

import json
import os
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.lab.slapos import (
    BTRFS_PATHS, COMPUTER, COMPUTER_ADDRESS6, NODE, SR2_URL, btrfs_srv,
    computer_address_on_master, deploy_node, node_install, node_service,
    partition_address, post_record, post_records, records, request,
    route_partitions, slapgrid)
from slaposha.lab.web import get
from slaposha.slapos.node import release_name

pytestmark = pytest.mark.lab

pytest.importorskip('slapos.grid.svcbackend',
                    reason='slapos.core is not installed')

INTERVAL = 0.5
SERVICE = node_service(INTERVAL, '''
    copy_interval = 1
    copy_retry = 1
    copy_retry_max = 4
    computer_address = true
    aside_retry = 1
''')
SR2 = '/opt/slapgrid/' + release_name(SR2_URL)


def who(lab, n):
    """What partition ``n`` answers at its address (seen from hO)."""
    return get(lab, 'hO', 'http://%s:8080/who' % partition_address(n), 2)


def status(lc, host):
    return json.loads(lc.cli(host, 'status', '--json').stdout)


def shown(lc, host, *words):
    """The status tree of ``host`` once every word is in it, else False."""
    out = lc.cli(host, 'status', check=False).stdout
    return all(w in out for w in words) and out


def programs(host):
    """'name RUNNING pid N' of each running program of the node on
    ``host``, as `slapos node supervisorctl status` shows them."""
    out = host.run([NODE + '/bin/slapos', 'node', 'supervisorctl', '--cfg',
                    '/etc/opt/slapos/slapos.cfg', 'status'], check=False).stdout
    return [' '.join(line.split()[:4]).rstrip(',') for line in
            out.splitlines() if ' RUNNING ' in line]


def lines_with(text, start):
    """The lines of ``text`` that begin (after spaces) with ``start``."""
    return [line for line in text.splitlines()
            if line.strip().startswith(start)]


def test_a_node_that_changes_stays_protected(make_lab):
    lab = make_lab(['hA', 'hB', 'hW', 'hM', 'hO'], paths=BTRFS_PATHS,
                   shared={NODE: node_install()})
    btrfs_srv(lab, ['hA', 'hB'])
    proxy = deploy_node(lab, 'hA', 'hM', others=('hB',), partitions=3)
    route_partitions(lab['hO'])
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'node': SERVICE}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    a, b = lab['hA'], lab['hB']
    try:
        wait_for(lambda: post_record(lab, 'record-0'), 30,
                 what='the partition storing records on hA')
        lc.wait_standby('hB', 'btrfs#slapgrid')

        # 1. hB cannot receive copies (its /opt/slapgrid read-only) when a
        # second software release and two partitions on it are added.
        b.run('mount --bind /opt/slapgrid /opt/slapgrid && '
              'mount -o remount,bind,ro /opt/slapgrid')
        slapgrid(lab['hM'], 'supply', SR2_URL, COMPUTER)
        request(lab, 'hM', 'second', SR2_URL)
        request(lab, 'hM', 'third', SR2_URL)
        slapgrid(a, 'node', 'software')
        slapgrid(a, 'node', 'instance')
        wait_for(lambda: who(lab, 1) and who(lab, 2), 30,
                 what='the new partitions answering on hA')
        # The owner published the change: hB is not eligible, naming the
        # release by its URL; the owner's status shows the failed copy.
        tree = wait_for(lambda: shown(lc, 'hB', 'not eligible: node',
                                      '%s (%s) is missing here'
                                      % (SR2_URL, SR2)), 30, interval=0.3,
                        what='hB not eligible for lack of %s' % SR2_URL)
        tree = wait_for(lambda: shown(lc, 'hB', 'to hB: ', ' ago: '), 30,
                        interval=0.3, what='the failed copy in the status')
        copy, = lines_with(tree, 'slapos#node')
        assert 'software release %s (%s) to hB: ' % (SR2_URL, SR2) in copy, \
            copy
        assert 'Read-only file system' in copy, copy
        # hB can receive again: the copy is retried by itself.
        b.run(['umount', '/opt/slapgrid'])
        lc.wait_standby('hB', 'btrfs#slapgrid')
        assert os.path.exists(b.path(SR2 + '/.completed'))

        # 2. The release deleted on hB comes back by itself.
        b.run(['rm', '-rf', SR2])
        wait_for(lambda: os.path.exists(b.path(SR2 + '/.completed')), 30,
                 interval=0.2, what='%s copied to hB again' % SR2)
        lc.wait_standby('hB', 'btrfs#slapgrid')

        # 3. slappart2's folder is lost on hA (its program file is still
        # there), then hA crashes.
        acked = ['record-0'] + post_records(lab, ['record-%d' % n
                                                  for n in range(1, 11)])
        assert len(acked) == 11
        a.run(['mv', '/srv/slapgrid/slappart2', '/srv/slapgrid/.slappart2'])
        time.sleep(4 * INTERVAL)  # in the snapshots hB has
        lc.wait_standby('hB', 'btrfs#slapgrid')
        lab.crash('hA')
        crashed = time.monotonic()
        wait_for(lambda: records(lab) is not None, 30, interval=0.1,
                 what='partition 0 answering from hB')
        took = time.monotonic() - crashed
        assert records(lab)[:len(acked)] == acked
        assert who(lab, 1) == 'recordstore slappart1'
        assert who(lab, 2) is None
        tree = wait_for(lambda: shown(lc, 'hB', 'node       warn     on hB',
                                      'slappart2'), 30, interval=0.3,
                        what='the node degraded on hB, naming slappart2')
        node, = lines_with(tree, 'slapos#node')
        assert 'warn  degraded: slappart2 set aside since' in node, node
        assert 'its folder /srv/slapgrid/slappart2 is missing while' \
            ' etc/supervisord.conf.d/slappart2.conf is still there' in node
        assert lines_with(tree, 'slappart0  started   1/1 running'), tree
        assert lines_with(tree, 'slappart2  started    ! set aside'), tree
        published = status(lc, 'hB')['services']['node']
        assert 'slappart2 set aside' in dict(
            (r[0], r[2]) for r in published['resources'])['slapos#node']
        assert 'slapos#node: partition slappart2 set aside: its folder' \
            in lc.log('hB')
        print('\npartitions 0 and 1 answered from hB %.2f s after hA crashed'
              ' with slappart2 set aside' % took)
        # The folder is back (an operator's repair): slappart2 starts in
        # the running supervisord by itself, the others untouched.
        running = programs(b)
        b.run(['mv', '/srv/slapgrid/.slappart2', '/srv/slapgrid/slappart2'])
        wait_for(lambda: who(lab, 2), 30, interval=0.3,
                 what='slappart2 answering on hB once its folder is back')
        assert who(lab, 2) == 'recordstore slappart2'
        after = programs(b)
        assert [p for p in after if p.startswith('slappart2:')], after
        assert set(running) < set(after)  # the same pids: untouched
        tree = wait_for(lambda: shown(lc, 'hB', 'slappart2  started   1/1'),
                        30, interval=0.3, what='slappart2 running in status')
        assert 'set aside' not in tree, tree
        assert 'slapos#node: partition slappart2 repaired' in lc.log('hB')
        # The partitions' IPv6 ranges (format gave each one) moved with
        # them: routed to hB as format routes them (hB never ran format).
        ranges = [json.loads(b.run(['cat', '/srv/slapgrid/slappart%d/'
                                    '.slapos-resource' % n]).stdout)
                  ['ipv6_range']['network'] for n in range(3)]
        local = b.run(['ip', '-6', 'route', 'show', 'table', 'local']).stdout
        for network in ranges:
            assert 'local %s dev lo' % network in local, (network, local)
        assert b.run(['sysctl', '-n', 'net.ipv6.ip_nonlocal_bind']
                     ).stdout.strip() == '1'
        # The computer's address moved with the node: `slapos node format`
        # on hB posts it, not hB's own address.
        assert COMPUTER_ADDRESS6 in b.run(['ip', '-6', 'addr']).stdout
        slapgrid(b, 'node', 'format', '--now')
        assert computer_address_on_master(lab) == COMPUTER_ADDRESS6

        # 4. 'second' is destroyed by SlapOS on hB: it drops out of the
        # partitions listed at once.
        lc.cli('hB', 'slapos', 'save-parameters')
        listed = json.loads(lc.cli('hB', 'slapos', 'partitions',
                                   '--json').stdout)['partitions']
        second, = [p['id'] for p in listed if p['title'] == 'second']
        request(lab, 'hM', 'second', SR2_URL, state='destroyed')
        slapgrid(b, 'node', 'instance', check=False)
        slapgrid(b, 'node', 'report', check=False)
        listed = json.loads(lc.cli('hB', 'slapos', 'partitions',
                                   '--json').stdout)['partitions']
        ids = [p['id'] for p in listed]
        assert second not in ids and 'slappart0' in ids, ids
    except Exception:
        for host in ('hA', 'hB'):
            print('--- %s status\n%s' % (host, lc.cli(host, 'status',
                                                   check=False).stdout))
            print('--- %s agent log (end)\n%s' % (host,
                                                 lc.log(host)[-6000:]))
        raise
    finally:
        lc.stop_agent('hB')
        proxy.terminate()
