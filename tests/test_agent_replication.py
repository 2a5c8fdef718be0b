"""The agents with btrfs replication: the owner's data reaches the standby
every interval over TLS; when the owner crashes, the standby promotes its
newest snapshot and the service goes on there with the data it had."""

import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.replication.lab import (
    LAB_PATHS, VOL, ReplicationLab, record_writer)

pytestmark = pytest.mark.lab

WRITER = record_writer(VOL)

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = 0.5
    [app#writer]
    command = exec python3 -u %s
'''


def records(lab, host):
    p = lab[host].run(['cat', VOL + '/records'], check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def test_takeover_keeps_the_replicated_data(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(WRITER)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'web': SERVICE % (VOL, writer)}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        def replicated():
            out = lc.cli('hB', 'status', check=False).stdout
            return 'btrfs#data' in out and 'hB' in out.split('btrfs#data')[1]\
                .split('\n')[0] and out
        tree = wait_for(replicated, 60, interval=0.5,
                        what='the owner replicating to hB')
        assert 'app#writer     up' in tree, tree
        # A subvolume made inside the volume is not in its snapshots: the
        # owner's status says so, naming it.
        lab['hA'].run(['btrfs', 'subvolume', 'create', VOL + '/cache'])
        tree = wait_for(lambda: 'not replicated: cache, nested subvolume' in
                        lc.cli('hB', 'status', check=False).stdout and
                        lc.cli('hB', 'status').stdout, 30, interval=0.5,
                        what='the nested subvolume in the status')
        assert 'btrfs#data     warn  not replicated: cache' in tree, tree
        assert '! 1 problem(s): web warn on hA: btrfs#data not replicated:' \
            ' cache' in tree.splitlines()[0], tree
        time.sleep(2)
        lab.crash('hA')
        crashed = time.monotonic()
        acked = 0
        with open(lab['hA'].path('/var/lib/slaposha/log') +
                  '/web.app.writer.log', errors='replace') as f:
            for line in f:
                if line.startswith('ack '):
                    acked = max(acked, int(line.split()[1]))
        assert acked > 50, 'the writer acknowledged too little: %d' % acked
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB owning web')
        def found_on_hb():
            try:
                with open(lab['hB'].path('/var/lib/slaposha/log') +
                          '/web.app.writer.log') as f:
                    for line in f:
                        if line.startswith('found '):
                            return int(line.split()[1]) or None
            except OSError:
                return None
        found = wait_for(found_on_hb, 30, interval=0.2,
                         what='the writer started on hB')
        took = time.monotonic() - crashed
        missing = max(0, acked - found)
        print('takeover with data after %.2f s; %d acknowledged records,'
              ' %d missing on hB (RPO)' % (took, acked, missing))
        # A consistent prefix: every record up to the last snapshot, then
        # what the writer appended on hB.
        kept = records(lab, 'hB')
        assert kept[:found] == list(range(1, found + 1))
        assert missing <= 2 * 0.5 / 0.02 + 50, 'more than ~2 intervals lost'
        # The writer goes on on hB from where the data was.
        wait_for(lambda: len(records(lab, 'hB')) > found + 10, 20,
                 what='the writer appending on hB')
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_max_lag_lets_a_fresh_service_start_where_its_data_is(make_lab):
    """max_lag keeps a standby with an old copy (or none) from taking over;
    the host with the service's original data, never copied, still starts
    it the first time (before, every host said "no copy here yet" and the
    service ran nowhere); the standby becomes eligible once it has a
    copy."""
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(WRITER)
    service = SERVICE.replace('hosts = hA hB', 'hosts = hB hA\n    max_lag = 5s')
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'web': service % (VOL, writer)}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        # hB is preferred but has no copy: hA, where the data is, starts it.
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hA', 40, interval=0.5,
                 what='hA owning web')
        out = lc.cli('hB', 'status', check=False).stdout
        assert 'no copy of %s here yet' % VOL in out, out
        wait_for(lambda: len(records(lab, 'hA')) > 10, 20,
                 what='the writer appending on hA')
        # Once hB has a fresh copy it may take the service over.
        def eligible():
            out = lc.cli('hB', 'status', check=False).stdout
            return 'web' in out and 'not eligible' not in out
        wait_for(eligible, 30, interval=0.5, what='hB eligible with a copy')
        lab.crash('hA')
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB taking web over')
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
