"""The agents with the rsync data driver: the owner's folder reaches the
standby every interval over TLS (real rsync); when the owner crashes, the
standby takes over with its last complete copy and the service goes on
there from that data."""

import json
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.lab.replication import crash_during_handover, record_writer

pytestmark = pytest.mark.lab

TREE = '/srv/slapgrid/data'
STORE = '/srv/slapgrid/.slaposha-rsync/data'

WRITER = record_writer(TREE)
WRITER_PY = 'writer.py'   # in the lab's folder

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


def start_web(make_lab):
    """Agents on hA and hB (witness hW) running web: the writer on an
    rsync-replicated folder. Returns (lab, cluster)."""
    lab = make_lab(['hA', 'hB', 'hW'])
    with open(lab.workdir + '/' + WRITER_PY, 'w') as f:
        f.write(WRITER)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, services={
        'web': SERVICE % (TREE, lab.workdir + '/' + WRITER_PY)},
        settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    return lab, lc


def test_takeover_after_a_crash_starts_from_the_last_complete_copy(
        make_lab):
    lab, lc = start_web(make_lab)
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


def test_a_target_crash_during_the_last_copy_is_cut_short(make_lab):
    """As with btrfs: a switch whose target crashes while the source sends
    it the last copy (a copy to it stalled there) is cut as soon as the
    target's lease is gone, not at the transfer's timeout (60 s, and
    stop_timeout 60 s), and the service runs on the source again within
    the lease TTL and a few seconds, on the source's own data."""
    lab, lc = start_web(make_lab)
    try:
        lc.wait_standby('hB', 'rsync#data')
        acked, back = crash_during_handover(
            lc, 'web', 'hA', 'hB', lab.workdir + '/' + WRITER_PY,
            b'rsync\x00--server')
        # Within the lease TTL (3 s by default) and a few seconds.
        assert back < 3 + 5, 'back on hA after %.1f s' % back
        log = lc.log('hA')
        assert 'rsync#data: hand-over to hB cut: hB lost' in log, \
            log[-3000:]
        assert 'abandon: the switch to hB' in log
        found = wait_for(lambda: [int(line.split()[1]) for line in
                                  writer_log(lab, 'hA')
                                  if line.startswith('found ')][1:], 10,
                         interval=0.1, what='the writer started again')
        assert found[0] >= acked, (found, acked)
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
