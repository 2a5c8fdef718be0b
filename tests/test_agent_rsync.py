"""The agents with the rsync data driver: the owner's folder reaches the
standby every interval over TLS (real rsync); when the owner crashes, the
standby takes over with its last complete copy and the service goes on
there from that data."""

import json
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.replication.lab import record_writer

pytestmark = pytest.mark.lab

TREE = '/srv/slapgrid/data'
STORE = '/srv/slapgrid/.slaposha-rsync/data'

WRITER = record_writer(TREE)

SERVICE = '''
    [service]
    hosts = hA hB
    [rsync#data]
    path = %s
    interval = 1s
    [app#writer]
    command = exec python3 -u %s
'''


def writer_log(lab, host):
    try:
        with open(lab[host].path('/var/lib/slaposha/log') +
                  '/web.app.writer.log', errors='replace') as f:
            return f.read().splitlines()
    except OSError:
        return []


def test_takeover_after_a_crash_starts_from_the_last_complete_copy(
        make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(WRITER)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'web': SERVICE % (TREE, writer)}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        def replicated():
            out = lc.cli('hB', 'status', check=False).stdout
            line = out.split('rsync#data')[1].split('\n')[0] \
                if 'rsync#data' in out else ''
            return 'hB: copy' in line and out
        tree = wait_for(replicated, 60, interval=0.5,
                        what='the owner copying to hB')
        assert 'app#writer     up' in tree, tree
        assert 'not crash-consistent' in tree, tree
        time.sleep(2.5)
        lab.crash('hA')
        crashed = time.monotonic()
        acks = [line.split() for line in writer_log(lab, 'hA')
                if line.startswith('ack ')]
        assert len(acks) > 50, 'the writer acknowledged too little'
        # hB's last complete copy, as it was when hA died.
        with open(lab['hB'].path(STORE + '/state.json')) as f:
            state = json.load(f)
        copy = state['records'][state['complete']]
        assert copy['host'] == 'hA' and copy['mode'] == 'live'
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB owning web')

        def found_on_hb():
            for line in writer_log(lab, 'hB'):
                if line.startswith('found '):
                    return int(line.split()[1]) or None
        found = wait_for(found_on_hb, 30, interval=0.2,
                         what='the writer started on hB')
        took = time.monotonic() - crashed
        acked = max(int(a[1]) for a in acks)
        # Every record acknowledged before the copy was taken is there;
        # nothing acknowledged after the copy ended could be.
        before = max([int(a[1]) for a in acks
                      if float(a[2]) < copy['created']] or [0])
        after = min([int(a[1]) for a in acks
                     if float(a[2]) > copy['received']] or [acked + 1])
        print('takeover with data after %.2f s; %d acknowledged records,'
              ' %d on hB (copy made %.2f s before the crash), %d missing'
              % (took, acked, found, time.time() - took - copy['created'],
                 acked - found))
        assert before <= found < after, (before, found, after)
        with open(lab['hB'].path(TREE + '/records')) as f:
            kept = [int(x) for x in f.read().split()]
        assert kept[:found] == list(range(1, found + 1))
        wait_for(lambda: len(open(lab['hB'].path(TREE + '/records'))
                             .read().split()) > found + 10, 20,
                 what='the writer appending on hB')
        status = lc.cli('hB', 'status', check=False).stdout
        assert 'rsync#data' in status
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
