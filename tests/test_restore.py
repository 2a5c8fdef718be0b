"""``slaposha restore SERVICE --at TIME``: the whole service back to a
snapshot, as a planned operation of its owner, in the lab (real etcd
members, agents, btrfs on loop devices, hosts as network namespaces): what
was written after the snapshot is kept aside, nothing is lost, the standby
follows the restored data, a takeover afterwards works; a restore whose
owner crashes midway ends, and the service never runs on two hosts."""

import datetime
import json
import re
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.lab.replication import (
    LAB_PATHS, SNAPDIR, VOL, ReplicationLab, record_writer,
    remove_mount_point)

pytestmark = pytest.mark.lab

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = 0.5
    # the last seconds, snapshot by snapshot (retention keeps one a minute)
    keep = 100
    [app#writer]
    command = exec python3 -u %s
'''

# A writer whose stop takes a few seconds (it finishes its work on
# SIGTERM): room to crash its host while a restore stops it.
SLOW_STOP = '''
import signal, sys, time
def finish(signum, frame):
    time.sleep(6)
    sys.exit(0)
signal.signal(signal.SIGTERM, finish)
'''


def test_what_cannot_be_restored_is_said_in_one_line(tmp_path):
    """Refused before anything is recorded: rsync or drbd data (no
    snapshots), no btrfs data, no time, a time that is none."""
    from types import SimpleNamespace
    from slaposha.actions import ActionError, Actions
    from slaposha.config import load_service
    from slaposha.intents import View
    files = {'files': '[rsync#data]\npath = /srv/files\n',
             'web': '[app#web]\ncommand = sleep 60\n',
             'db': '[btrfs#data]\nvolume = /srv/db/data\n'}
    confs = {}
    for name, text in files.items():
        (tmp_path / (name + '.cfg')).write_text(text)
        confs[name] = load_service(str(tmp_path / (name + '.cfg')))
    agent = SimpleNamespace(confs=confs)
    for name, at, what in [
            ('files', '5m ago', 'files: [rsync#data] keeps no snapshots:'
             ' restore --at is for btrfs data only'),
            ('web', '5m ago', 'web has no [btrfs#...] resource'),
            ('db', ' ', 'restore needs a time or a snapshot name'),
            ('db', 'yesterday-ish', '--at yesterday-ish: expected a'
             ' snapshot name'),
            ('db', '99999999999d ago', '--at 99999999999d ago: not a time'
             ' snapshots can have been taken at')]:
        with pytest.raises(ActionError) as e:
            Actions._ask_restore(agent, name, View(name), {'at': at}, 'me',
                                 None)
        assert str(e.value).startswith(what) and '\n' not in str(e.value)


@pytest.fixture(scope='module', autouse=True)
def mount_point():
    yield
    remove_mount_point()


def records(lab, host, folder=VOL):
    p = lab[host].run(['cat', folder + '/records'], check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def writer_log(lab, host):
    """[(word, n, time)] of the writer's output on ``host``."""
    lines = []
    try:
        with open(lab[host].path('/var/lib/slaposha/log') +
                  '/web.app.writer.log', errors='replace') as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] in ('found', 'ack'):
                    lines.append((parts[0], int(parts[1]), float(parts[2])))
    except OSError:
        pass
    return lines


def founds(lab, host):
    return [n for word, n, _ in writer_log(lab, host) if word == 'found']


def service_status(lc, via):
    p = lc.cli(via, 'status', '--json', check=False)
    try:
        return json.loads(p.stdout)['services']['web']
    except (ValueError, KeyError, TypeError):
        return {}


def start_cluster(make_lab, writer_program, more=''):
    """hA running web (the writer, then ``more`` resources), hB its
    standby with a copy."""
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    rl = ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(writer_program)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                    services={'web': SERVICE % (VOL, writer) + more},
                    settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hA', 60, interval=0.5,
                 what='hA owning web')
        lc.wait_standby('hB', 'btrfs#data')
        wait_for(lambda: len(records(lab, 'hA')) > 50, 30, interval=0.5,
                 what='the writer appending on hA')
    except BaseException:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
        raise
    return lab, rl, lc


def test_restore_at_a_time_under_a_writer_keeps_the_rest_aside(make_lab):
    lab, rl, lc = start_cluster(make_lab, record_writer(VOL))
    try:
        time.sleep(1)
        at = time.time()
        time.sleep(2.5)
        # A mark of "after T" in the data, replicated to hB.
        lab['hA'].run(['touch', VOL + '/after-T'])
        wait_for(lambda: lab['hB'].run(['sh', '-c', 'test -e "$(ls -d %s/0*'
                                        ' | sort | tail -1)"/after-T'
                                        % SNAPDIR], check=False)
                 .returncode == 0, 20, interval=0.5,
                 what='hB having the mark')
        stamp = datetime.datetime.fromtimestamp(
            at, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S.%f')
        # Asked on the standby: its agent records it, the owner runs it.
        asked = time.time()
        p = lc.cli('hB', 'restore', 'web', '--at', stamp, '--yes',
                   check=False)
        assert p.returncode == 0, (p.stdout, p.stderr)
        acked = [n for word, n, t in writer_log(lab, 'hA')
                 if word == 'ack' and t < asked]
        snapshot = re.search(r'back to ([0-9]+-[0-9]+) \(taken ', p.stdout)
        assert snapshot and 'restored on hA after' in p.stdout, p.stdout
        aside = re.search(r'kept aside on hA as (\S+)', p.stdout).group(1)
        # The writer started again from the snapshot's records: every one
        # acknowledged 1.5 s before T or earlier is there, none written
        # after T.
        found = wait_for(lambda: len(founds(lab, 'hA')) >= 2 and
                         founds(lab, 'hA')[-1], 30, interval=0.2,
                         what='the writer started again on hA')
        assert len(founds(lab, 'hA')) == 2, founds(lab, 'hA')
        # The snapshot restored is the newest taken at or before T: every
        # record acknowledged before it was taken is there, and only those
        # written while it was taken (btrfs snapshot: a few ms) besides.
        taken = json.loads(lab['hA'].run(['cat', '%s/.meta/%s.json' % (
            SNAPDIR, snapshot.group(1))]).stdout)['created']
        assert taken <= at
        later = [json.loads(lab['hA'].run(['cat', meta]).stdout)['created']
                 for meta in lab['hA'].run(
                     ['sh', '-c', 'ls %s/.meta/*.json' % SNAPDIR]).stdout
                 .split()]
        assert not [t for t in later if taken < t <= at], (taken, at)
        kept = [n for word, n, t in writer_log(lab, 'hA')
                if word == 'ack' and t < taken]
        soon = [n for word, n, t in writer_log(lab, 'hA')
                if word == 'ack' and t < taken + 0.5]
        assert max(kept or [0]) <= found <= max(soon or [0]) + 1, (
            found, kept[-1:], soon[-1:])
        wait_for(lambda: len(records(lab, 'hA')) > found + 20, 20,
                 what='the writer appending on the restored data')
        live = records(lab, 'hA')
        assert live == list(range(1, len(live) + 1))
        assert lab['hA'].run(['test', '-e', VOL + '/after-T'],
                             check=False).returncode == 1
        # What was there before is kept aside, listed like a diverged copy:
        # every record acknowledged before the restore was asked.
        copies = json.loads(lc.cli('hA', 'data', 'diverged', 'list',
                                   '--json').stdout)
        mine = [c for c in copies if c['id'] == aside]
        assert len(mine) == 1 and 'restore to %s asked by' % \
            snapshot.group(1) in mine[0]['reason'], copies
        kept = records(lab, 'hA', mine[0]['path'])
        assert kept == list(range(1, len(kept) + 1))
        assert len(kept) >= max(acked), (len(kept), max(acked))
        assert lab['hA'].run(['test', '-e', mine[0]['path'] + '/after-T'],
                             check=False).returncode == 0
        # The cluster says how it ended; nothing is left in progress.
        svc = service_status(lc, 'hB')
        assert svc['restore'] is None and svc['operation'] is None, svc
        assert svc['restored']['outcome'] == 'done' and \
            svc['restored']['to'] == snapshot.group(1), svc
        assert 'restore to %s done' % snapshot.group(1) in \
            lc.cli('hB', 'status').stdout
        # The standby follows the restored data (its newest copy has the
        # writer's new records and no mark), then takes it over.
        def standby_follows():
            newest = lab['hB'].run(['sh', '-c', 'ls -d %s/0* | sort -t- -k2n'
                                    ' -k1n | tail -1' % SNAPDIR],
                                   check=False).stdout.strip()
            return newest and lab['hB'].run(
                ['test', '-e', newest + '/after-T'],
                check=False).returncode == 1 and \
                len(records(lab, 'hB', newest)) > found + 20 and newest
        wait_for(standby_follows, 30, interval=0.5,
                 what='hB receiving the restored data')
        lab.crash('hA')
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB taking web over')
        on_b = wait_for(lambda: founds(lab, 'hB') and founds(lab, 'hB')[-1],
                        30, interval=0.2, what='the writer started on hB')
        assert on_b > found + 20
        wait_for(lambda: len(records(lab, 'hB')) > on_b + 10, 20,
                 what='the writer appending on hB')
        moved = records(lab, 'hB')
        assert moved == list(range(1, len(moved) + 1))
        assert lab['hB'].run(['test', '-e', VOL + '/after-T'],
                             check=False).returncode == 1
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_a_restore_whose_owner_crashes_midway_ends_undone(make_lab):
    lab, rl, lc = start_cluster(make_lab, SLOW_STOP + record_writer(VOL))
    try:
        bad = lc.cli('hB', 'restore', 'web', '--at', 'never', '--yes',
                     check=False)
        assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and \
            'expected a snapshot name' in bad.stderr, bad
        p = lc.cli('hB', 'restore', 'web', '--at', '1s ago', '--yes',
                   '--no-wait')
        assert p.stdout.startswith('web: restoring on hA to the newest'), \
            p.stdout
        # hA stops the writer (which takes 6 s) to restore: crash it then.
        wait_for(lambda: 'stopping it to bring its data back' in
                 lc.log('hA'), 20, interval=0.1, what='hA stopping web')
        assert 'restore' in (service_status(lc, 'hB').get('operation') or
                             {}).get('kind', '')
        lab.crash('hA')
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB taking web over')
        # hB, the new owner, ends it: undone, it runs from hB's copy.
        svc = wait_for(lambda: (service_status(lc, 'hB').get('restored') or
                                {}).get('outcome') and
                       service_status(lc, 'hB'), 20, interval=0.3,
                       what='the restore ended')
        assert svc['restore'] is None and svc['operation'] is None, svc
        assert svc['restored']['outcome'] == 'undone' and \
            svc['restored']['from'] == 'hB' and 'hA, which was to run it' \
            in svc['restored']['reason'], svc['restored']
        wait_for(lambda: founds(lab, 'hB'), 30, interval=0.2,
                 what='the writer started on hB')
        started_on_a = len(founds(lab, 'hA'))
        # hA comes back: a standby; the service runs on hB only.
        lab.restart('hA')
        rl.mount('hA')
        lc.start_agent('hA')
        lc.wait_agent('hA')
        lc.wait_standby('hA', 'btrfs#data')
        time.sleep(2)
        svc = service_status(lc, 'hA')
        assert svc['owner'] == 'hB' and svc['restore'] is None, svc
        assert (svc['on']['hA'] or {}).get('state') == 'stopped', svc['on']
        assert len(founds(lab, 'hA')) == started_on_a
        moved = records(lab, 'hB')
        assert moved == list(range(1, len(moved) + 1))
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


GUARD = '''
    [app#guard]
    start = test ! -e %s/poison
    stop = true
    check = true
''' % VOL


def test_a_restore_whose_start_fails_puts_the_data_back(make_lab):
    """The service does not start on the snapshot (a resource refuses
    it): the data before the restore is back and the service runs on it
    again, nothing lost; the command says it was undone and why."""
    lab, rl, lc = start_cluster(make_lab, record_writer(VOL), GUARD)
    try:
        lab['hA'].run(['touch', VOL + '/poison'])
        time.sleep(1.5)
        at = time.time()
        time.sleep(0.5)
        lab['hA'].run(['rm', VOL + '/poison'])
        time.sleep(1.5)
        asked = time.time()
        p = lc.cli('hB', 'restore', 'web', '--at', datetime.datetime
                   .fromtimestamp(at, datetime.timezone.utc).strftime(
                       '%Y-%m-%d %H:%M:%S.%f'), '--yes', check=False)
        acked = max(n for word, n, t in writer_log(lab, 'hA')
                    if word == 'ack' and t < asked)
        assert p.returncode == 2 and p.stderr.count('\n') == 1, p
        assert 'the restore was undone after' in p.stderr and \
            'it did not start on the restored data: start failed at' \
            ' app#guard' in p.stderr and 'the data before is back' in \
            p.stderr, p.stderr
        # Started again on the data it had: every record acknowledged
        # before the restore is there, and the writer goes on after them.
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hA' and
                 (service_status(lc, 'hB').get('on', {}).get('hA') or {})
                 .get('state') == 'running', 30, interval=0.3,
                 what='web running on hA again')
        found = founds(lab, 'hA')[-1]
        assert found >= acked, (found, acked)
        wait_for(lambda: len(records(lab, 'hA')) > found + 10, 20,
                 what='the writer appending on hA')
        live = records(lab, 'hA')
        assert live == list(range(1, len(live) + 1))
        assert lab['hA'].run(['test', '-e', VOL + '/poison'],
                             check=False).returncode == 1
        svc = service_status(lc, 'hB')
        assert svc['restore'] is None and \
            svc['restored']['outcome'] == 'undone', svc
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
