"""The agents with btrfs replication: the owner's data reaches the standby
every interval over TLS; when the owner crashes, the standby promotes its
newest snapshot and the service goes on there with the data it had."""

import json
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster, marked_pids
from slaposha.lab.replication import (
    LAB_PATHS, VOL, ReplicationLab, ask_switch, crash_during_handover,
    record_writer, stall_receive)

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


def start_web(make_lab, stop_timeout):
    """hA, hB (with btrfs disks) and hW; agents on hA and hB running web
    (the writer on the replicated volume, btrfs#data with
    ``stop_timeout``). Returns (lab, its ReplicationLab, the cluster, the
    writer's path)."""
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    rl = ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(WRITER)
    service = (SERVICE % (VOL, writer)).replace(
        'interval = 0.5', 'interval = 0.5\n    stop_timeout = ' + stop_timeout)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'web': service}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    return lab, rl, lc, writer


def writer_lines(lab, host, word):
    """The numbers of the writer's ``word`` lines (found, ack) on
    ``host``, in order."""
    try:
        with open(lab[host].path('/var/lib/slaposha/log') +
                  '/web.app.writer.log', errors='replace') as f:
            return [int(line.split()[1]) for line in f
                    if line.startswith(word + ' ')]
    except OSError:
        return []


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
    service ran nowhere); the standby becomes eligible as soon as a copy
    lands (its receiver wakes the agent), not at its next periodic check
    (monitor_interval, a minute here: before, hB stayed "not eligible"
    that long with a fresh copy)."""
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(WRITER)
    service = SERVICE.replace('hosts = hA hB', 'hosts = hB hA\n    max_lag = 5s')
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'web': service % (VOL, writer)}, settings='''
                    [agent]
                    monitor_interval = 60s
                    ''').start()
    try:
        # hB is preferred but has no copy: hA, where the data is, starts it.
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hA', 40, interval=0.5,
                 what='hA owning web')
        # hB said why it could not take it (its status may already show a
        # copy: one arrives every 0.5 s once hA runs it).
        assert 'no copy of %s here yet' % VOL in lc.log('hB')
        wait_for(lambda: len(records(lab, 'hA')) > 10, 20,
                 what='the writer appending on hA')
        # Once hB has a fresh copy it may take the service over.
        def eligible():
            out = lc.cli('hB', 'status', check=False).stdout
            return 'web' in out and 'not eligible' not in out
        wait_for(eligible, 15, interval=0.5, what='hB eligible with a copy')
        lab.crash('hA')
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB taking web over')
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def diverged_on(lc, via, host):
    """The diverged copies of web that ``host`` keeps, as the cluster's
    status (JSON) says, asked on ``via``."""
    p = lc.cli(via, 'status', '--json', check=False)
    try:
        on = json.loads(p.stdout)['services']['web']['on'][host] or {}
    except (ValueError, KeyError, TypeError):
        return None
    return on.get('diverged', [])


def test_crashes_leave_diverged_copies_listed_bounded_and_dropped(make_lab):
    """Each crash of the owner while it writes leaves on it, once it is
    back, a copy of what it wrote after its last snapshot: the status lists
    it (host, when, token, size), diverged_keep bounds them and keeps the
    newest, an operator drops one by id. The planned switches back produce
    none."""
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    rl = ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(WRITER)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, services={
        'web': (SERVICE % (VOL, writer)).replace(
            'interval = 0.5', 'interval = 0.5\n    diverged_keep = 2')},
        settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        seen = []
        for round in range(3):
            lc.wait_owner('web', 'hW')
            if lc.owner('web', 'hW')[0] != 'hA':
                lc.cli('hB', 'switch', 'web', '--to', 'hA')
                wait_for(lambda: lc.owner('web', 'hW')[0] == 'hA', 60,
                         interval=0.5, what='hA owning web again')
            lc.wait_standby('hB', 'btrfs#data')
            time.sleep(1.5)
            # the planned switch kept nothing aside on hB
            assert diverged_on(lc, 'hA', 'hB') == []
            lab.crash('hA')
            wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30,
                     interval=0.2, what='hB owning web')
            lab.restart('hA')
            rl.mount('hA')
            lc.start_agent('hA')
            lc.wait_agent('hA')
            new = wait_for(
                lambda: [c for c in diverged_on(lc, 'hB', 'hA') or []
                         if c['id'] not in seen], 60, interval=0.5,
                what='hA listing a new diverged copy')
            seen += [c['id'] for c in new]
            copies = diverged_on(lc, 'hB', 'hA')
            assert 1 <= len(copies) <= 2, copies
            newest = max(copies, key=lambda c: c['at'])
            assert newest['id'] in [c['id'] for c in new]
            for copy in copies:
                assert copy['rid'] == 'btrfs#data' and copy['size'] > 0 and \
                    copy['token'], copy
            tree = lc.cli('hB', 'status').stdout
            assert 'diverged btrfs#data     %s' % newest['id'] in tree, tree
        assert len(seen) >= 3, seen
        # The operator's view on hA: the same copies; one dropped by id.
        listed = json.loads(lc.cli('hA', 'data', 'diverged', 'list',
                                   '--json').stdout)
        assert sorted(c['id'] for c in listed) == sorted(
            c['id'] for c in copies)
        bad = lc.cli('hA', 'data', 'diverged', 'drop', 'web', 'nonesuch',
                     '--yes', check=False)
        assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and \
            "no diverged copy 'nonesuch' of service web" in bad.stderr, bad
        gone = copies[0]['id']
        out = lc.cli('hA', 'data', 'diverged', 'drop', 'web', gone,
                     '--yes').stdout
        assert out.startswith('deleted the diverged copy %s' % gone), out
        wait_for(lambda: gone not in [c['id'] for c in
                                      diverged_on(lc, 'hB', 'hA') or []],
                 10, interval=0.5, what='the status without %s' % gone)
        assert gone not in lc.cli('hA', 'data', 'diverged', 'list').stdout
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_a_target_crash_during_the_last_snapshot_is_cut_short(make_lab):
    """A switch whose target crashes while the source hands its data over
    (the applications stopped there, a send to it on its way): the
    hand-over is cut as soon as the target's lease is gone, not when the
    transfer times out (30 s; stop_timeout raised to 60 s here), and the
    service runs on the source again within the lease TTL and a few
    seconds, on the source's own data (nothing acknowledged is lost,
    nothing kept aside); the switch is abandoned, and nothing moves when
    the target comes back."""
    lab, rl, lc, writer = start_web(make_lab, stop_timeout='60')
    try:
        lc.wait_standby('hB', 'btrfs#data')
        token = lc.owner('web', 'hW')[1]
        acked, back = crash_during_handover(lc, 'web', 'hA', 'hB', writer,
                                            b'btrfs\x00receive\x00-q')
        # Within the lease TTL (3 s by default) and a few seconds.
        assert back < 3 + 5, 'back on hA after %.1f s' % back
        log = lc.log('hA')
        assert 'btrfs#data: hand-over to hB cut: hB lost' in log, log[-3000:]
        # The cut is ours, not hB's answer: the send says it was aborted.
        assert 'aborted' in log and 'without an answer' not in log, \
            log[-3000:]
        assert 'abandon: the switch to hB' in log
        # The source's data is the live one: the writer found every record
        # it acknowledged before the switch; nothing was kept aside.
        found = wait_for(lambda: writer_lines(lab, 'hA', 'found')[1:], 10,
                         interval=0.1, what='the writer started again')
        assert found[0] >= acked, (found, acked)
        assert 'kept aside' not in log and 'diverged' not in log
        # It never left hA: the same owner key, the same token.
        owner = lc.owner('web', 'hW')
        assert owner == ('hA', token), (owner, token)
        # hB comes back: nothing moves, nothing restarts on hA.
        pids = marked_pids(lab['hA'], writer)
        lab.restart('hB')
        rl.mount('hB')
        lc.start_agent('hB')
        lc.wait_agent('hB')
        for _ in range(16):
            time.sleep(0.5)
            assert lc.owner('web', 'hW') == owner
            assert marked_pids(lab['hA'], writer) == pids
        assert not marked_pids(lab['hB'], writer)
        assert lc.log('hA').count('switch: moving it to hB') == 1
        kept = records(lab, 'hA')
        assert kept == list(range(1, len(kept) + 1)) and len(kept) > acked
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_a_switch_whose_target_misses_the_last_snapshot_is_abandoned(
        make_lab):
    """A switch whose target is alive but does not get the last snapshot
    within stop_timeout (its disk stalled: a receive stopped) would start
    the service there on an older copy, without what was written since
    (before, it did, and the source kept that aside as diverged): the
    switch is abandoned, saying why, and the service starts again on the
    source, on its own data; it stays there once the target's disk is
    back."""
    lab, rl, lc, writer = start_web(make_lab, stop_timeout='2')
    try:
        lc.wait_standby('hB', 'btrfs#data')
        stalled = stall_receive(lab, 'hB', b'btrfs\x00receive\x00-q')
        ask_switch(lc, 'web', 'hA', 'hB')
        wait_for(lambda: not marked_pids(lab['hA'], writer), 20,
                 interval=0.05, what='the writer stopped on hA')
        acked = writer_lines(lab, 'hA', 'ack')[-1]
        found = wait_for(lambda: writer_lines(lab, 'hA', 'found')[1:], 30,
                         interval=0.1, what='the writer started again')
        assert found[0] >= acked, (found, acked)
        owner = lc.owner('web', 'hW')
        assert owner[0] == 'hA', owner
        log = lc.log('hA')
        assert 'abandon: the switch to hB' in log, log[-3000:]
        assert 'hB did not get the last copy of btrfs#data: ' in log
        assert 'kept aside' not in log and 'diverged' not in log
        abandoned = json.loads(lc.cli('hA', 'status', '--json').stdout)[
            'services']['web']['abandoned']
        assert abandoned['reason'].startswith(
            'hB did not get the last copy of btrfs#data'), abandoned
        # hB's disk is back: it gets the data; nothing moves.
        lab.resume('hB', stalled)
        for _ in range(8):
            time.sleep(0.5)
            assert lc.owner('web', 'hW') == owner
        assert not marked_pids(lab['hB'], writer)
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
