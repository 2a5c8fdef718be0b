"""The daily export as a task (``[export#...]``): the folder's retention
and the status lines without the lab; then in the lab, agents on real
btrfs: the owner exports on schedule, keep is respected, a folder that
cannot be written shows as one problem while the service goes on, and the
series goes on on the new owner after a takeover."""

import json
import os
import time

import pytest

from slaposha.backup import _chain, exports_in, prune_exports
from slaposha.config import Section
from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.lab.replication import (
    LAB_PATHS, SNAPDIR, VOL, ReplicationLab, record_writer)
from slaposha.resources import NA, WARN
from slaposha.resources.export import Export
from slaposha.service import Context

lab = pytest.mark.lab


class FakeVolume(object):
    path = VOL
    name = os.path.basename(VOL)


def write_export(folder, snapshot, parent, created, label='web'):
    path = os.path.join(folder, '%s-%s-%s.btrfs.zst' % (
        label, FakeVolume.name, snapshot))
    with open(path, 'w') as f:
        f.write('stream')
    with open(path + '.sha256', 'w') as f:
        f.write('x  y\n')
    with open(path + '.json', 'w') as f:
        json.dump({'volume': VOL, 'service': label, 'snapshot': snapshot,
                   'parent': parent, 'created': created,
                   'exported': created}, f)
    return os.path.basename(path)


def test_keep_never_deletes_a_parent_a_kept_export_needs(tmp_path):
    folder = str(tmp_path)
    names = [write_export(folder, '000001-3', None, 1),
             write_export(folder, '000002-3', '000001-3', 2),
             write_export(folder, '000003-3', '000002-3', 3),
             write_export(folder, '000004-3', None, 4),
             write_export(folder, '000005-3', '000004-3', 5)]
    other = write_export(folder, '000001-3', None, 1, label='db')
    open(os.path.join(folder, 'web-%s-000006-3.btrfs.zst.part'
                      % FakeVolume.name), 'w').close()
    # keep 3: the newest three need the chain back to the full 000001-3.
    assert [os.path.basename(p) for p in prune_exports(
        folder, FakeVolume(), 'web', 3)] == [
            'web-%s-000006-3.btrfs.zst.part' % FakeVolume.name]
    assert len(exports_in(folder, FakeVolume(), 'web')) == 5
    # keep 2: the newest two are a chain of their own; the older one goes,
    # files and all; another service's export in the folder stays.
    gone = prune_exports(folder, FakeVolume(), 'web', 2)
    assert sorted(os.path.basename(p) for p in gone) == names[:3]
    assert sorted(os.listdir(folder)) == sorted(
        n + s for n in names[3:] + [other] for s in ('', '.json', '.sha256'))


def export_resource(tmp_path, every=10.0):
    values = dict(to=str(tmp_path), every=every, incremental=True,
                  full_every=7, keep=7, delay=0.0, retry=5.0, timeout=60.0,
                  optional=False, disable=False)
    section = Section('export#daily', values)
    section.kind, section.rid = 'export', 'export#daily'
    section._service_file = str(tmp_path / 'web.cfg')
    res = Export(section, Context('web', None, str(tmp_path / 'log')))
    res.enabled, res.next_due = True, time.monotonic() + 3600
    return res


def test_status_says_the_last_export_a_failure_and_a_late_one(tmp_path):
    res = export_resource(tmp_path)
    res.looked = True
    assert res.status() == (NA, 'no export in %s yet; next in 59m'
                            % tmp_path)
    now = time.time()
    res.newest = {'exported': now - 5, 'snapshot': '000412-7',
                  'bytes': 3200000, 'parent': '000300-7'}
    st = res.status()
    assert st.state == NA and st.message.startswith(
        'last export %s UTC (5s ago): 000412-7, 3.2 MB, incremental' %
        time.strftime('%Y-%m-%d %H:%M', time.gmtime(now - 5))), st
    res.failed = (now - 3 * 3600, '--to %s: no such folder' % tmp_path)
    st = res.status()
    assert st.state == WARN and st.message.startswith(
        'last export failed 3h ago: --to %s: no such folder; last export'
        % tmp_path), st
    res.failed = None
    res.newest['exported'] = now - 26 * 3600
    res.conf.every = 12 * 3600.0
    st = res.status()
    assert st.state == WARN and st.message.startswith('no export for 26h;')
    res.conf.every = 13 * 3600.0 + 1
    assert res.status().state == NA
    res.enabled = False
    assert res.status() == (NA, 'not scheduled here')


def test_the_run_s_outcome_is_read_from_its_log(tmp_path):
    res = export_resource(tmp_path)
    os.makedirs(res.context.log_dir)
    with open(res._log_path(), 'w') as f:
        f.write('# 2026-12-04 12:00:00 run: slaposha export web\n'
                'slaposha: --to /nowhere: no such folder\n'
                '# 2026-12-04 12:00:01 exit 2 after 0.5 s\n'
                '# 2026-12-04 12:00:09 run: slaposha export web\n'
                '{"snapshot": "000412-7", "exported": 5}\n'
                '# 2026-12-04 12:00:10 exit 0 after 0.9 s\n')
    assert res._outcome_of_run() == ([{'snapshot': '000412-7',
                                       'exported': 5}], None)
    with open(res._log_path(), 'a') as f:
        f.write('# 2026-12-04 12:00:19 run: slaposha export web\n'
                'slaposha: export of 000413-7 failed, nothing kept: zstd:'
                ' No space left on device\n')
    assert res._outcome_of_run() == ([], 'export of 000413-7 failed,'
                                     ' nothing kept: zstd: No space left'
                                     ' on device')


# -- the lab ------------------------------------------------------------------

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = 0.5
    [app#writer]
    command = exec python3 -u %s
    [export#daily]
    to = %s
    every = 6s
    delay = 1s
    full_every = 4
    keep = 2
    retry = 2s
    timeout = 60s
'''


def exports(folder):
    return exports_in(folder, None, 'web')


def status_line(lc, host):
    return lc.cli(host, 'status', check=False).stdout


@lab
def test_the_owner_exports_on_schedule_and_the_series_moves_with_it(
        make_lab):
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS)
    ReplicationLab(lab, disk_size='256M')
    writer = lab.workdir + '/writer.py'
    with open(writer, 'w') as f:
        f.write(record_writer(VOL))
    folder = os.path.join(lab.workdir, 'exports')
    os.makedirs(folder)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, services={
        'web': SERVICE % (VOL, writer, folder)}, settings='''
        [agent]
        monitor_interval = 0.5
        ''').start()
    try:
        # Six runs: full, three incremental, full again (full_every 4), one
        # incremental; by then keep 2 has deleted the first chain.
        first = wait_for(lambda: exports(folder), 30, interval=0.2,
                         what='a first export on hA')[0]
        assert first['parent'] is None and first['note'] == 'full: no' \
            ' earlier export in %s whose snapshot this host still has' \
            % folder, first

        def second_chain():
            made = exports(folder)
            return len(made) == 2 and made[0]['snapshot'] != \
                first['snapshot'] and made[1]['parent'] and made
        made = wait_for(second_chain, 90, interval=0.2,
                        what='six exports on hA, the first four deleted')
        assert [m['host'] for m in made] == ['hA', 'hA'], made
        assert made[0]['parent'] is None and \
            made[1]['parent'] == made[0]['snapshot'], made
        assert not [n for n in os.listdir(folder) if n.endswith('.part')]
        # Only hA ran it: hB's task log is empty.
        assert not os.path.exists(lab['hB'].path('/var/lib/slaposha/log')
                                  + '/web.export.daily.log')
        tree = status_line(lc, 'hB')
        line = [x for x in tree.splitlines() if 'export#daily' in x]
        assert line and ' n/a ' in line[0] and 'last export ' in line[0] \
            and 'ago): 0' in line[0], tree
        assert tree.splitlines()[0].endswith('every host alive'), tree

        # The folder cannot be written on hA (read-only there): one
        # problem in every host's status; the service goes on.
        a = lab['hA']
        a.run('mount --bind {f} {f} && mount -o remount,bind,ro {f}'
              .format(f=folder))
        try:
            def failed():
                out = status_line(lc, 'hB')
                return 'last export failed' in out.splitlines()[0] and out
            tree = wait_for(failed, 30, interval=0.5,
                            what='the failed export in the status')
            head = tree.splitlines()[0]
            assert '! 1 problem(s): web: last export failed ' in head and \
                ': cannot write in %s: Read-only file system' % folder in \
                head, head
            line = [x for x in tree.splitlines() if 'export#daily' in x]
            assert ' warn ' in line[0], tree
            assert 'app#writer     up' in tree and 'btrfs#data     up' in \
                tree, tree
            count = len(a.run(['cat', VOL + '/records']).stdout.split())
            wait_for(lambda: len(a.run(['cat', VOL + '/records']).stdout
                                 .split()) > count + 10, 10,
                     what='the writer going on')
        finally:
            a.run(['umount', folder])
        wait_for(lambda: 'last export failed' not in status_line(lc, 'hB'),
                 30, interval=0.5, what='the export working again')
        before = exports(folder)
        # hB keeps the snapshot of hA's last export, long after replication
        # would have pruned it (keep 3, a snapshot every 0.5 s or sooner).
        time.sleep(4)
        assert lab['hB'].run(['test', '-d', '%s/%s' % (
            SNAPDIR, before[-1]['snapshot'])], check=False).returncode == 0

        lab.crash('hA')
        wait_for(lambda: lc.owner('web', 'hW')[0] == 'hB', 30, interval=0.2,
                 what='hB owning web')
        wait_for(lambda: any(m['host'] == 'hB' for m in exports(folder)),
                 60, interval=0.5, what='an export made on hB')
        after = [m for m in exports(folder) if m['host'] == 'hB']
        print('first export on hB: %s' % after[0]['note'])
        # It follows the series: no sooner than every after the last one
        # of hA's in the folder (and delay after the start), incremental
        # against it (hB kept its snapshot), unless its chain was long
        # enough.
        assert after[0]['exported'] >= before[-1]['exported'] + 6 - 0.5
        last = [m for m in exports(folder) if m['host'] == 'hA'][-1]
        if _chain(exports(folder), last) < 4:
            assert after[0]['parent'] == last['snapshot'], after[0]
        else:
            assert after[0]['note'].startswith('full: the previous export'
                                               ' ends a chain of 4')
        tree = status_line(lc, 'hB')
        line = [x for x in tree.splitlines() if 'export#daily' in x]
        assert line and 'last export ' in line[0], tree
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
