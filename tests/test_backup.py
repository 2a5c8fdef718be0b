"""Backups from the snapshots hosts keep: ``slaposha snapshots`` and
``slaposha restore --path --to``; bad input without the lab, then a
partition's files deleted by mistake and restored in the lab, on real btrfs
file systems, while the service goes on writing and replicating."""

import datetime
import os
import re
import subprocess
import sys
import time

import pytest

from slaposha.backup import BackupError, parse_time
from slaposha.lab import wait_for
from slaposha.lab.replication import (
    FS, LAB_PATHS, SNAPDIR, VOL, ReplicationLab, read_report, record_writer,
    remove_mount_point)

lab = pytest.mark.lab


def test_times_for_at():
    assert parse_time('2026-12-04 12:30') == datetime.datetime(
        2026, 12, 4, 12, 30, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_time('2026-12-04T13:30:00+01:00') == \
        parse_time('2026-12-04 12:30:00')
    assert parse_time('90s ago', now=1000) == 910
    assert parse_time('2h ago', now=10000) == 2800
    with pytest.raises(BackupError, match='expected a snapshot name'):
        parse_time('yesterday-ish')


def cli(slaposha_cmd, *args):
    p = subprocess.run(slaposha_cmd + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    return p.returncode, p.stdout, p.stderr


def test_bad_input_is_one_line(slaposha_cmd, tmp_path):
    web = tmp_path / 'web.cfg'
    web.write_text('[app#web]\nstart = true\n')
    for args, what in [
            (['snapshots', str(tmp_path / 'none.cfg')], 'no such service'),
            (['snapshots', str(web)], 'has no [btrfs#...] resource'),
            (['restore', str(web), '--at', '5m ago'], 'name a service of the'),
            (['restore', str(web), '--at', '5m ago', '--to', 'x'],
             'give both --path P and --to DIR'),
            (['restore', str(web), '--at', '5m ago', '--path', 'p', '--to',
              str(tmp_path / 'x')], 'has no [btrfs#...] resource')]:
        code, out, err = cli(slaposha_cmd, *args)
        assert code == 2 and out == '', args
        assert what in err and err.count('\n') == 1, (args, err)


# -- the lab ------------------------------------------------------------------

@pytest.fixture(scope='module', autouse=True)
def mount_point():
    yield
    remove_mount_point()


@pytest.fixture
def pair(make_lab):
    p = ReplicationLab(make_lab(['hA', 'hB'], paths=LAB_PATHS))
    try:
        yield p
    finally:
        p.stop_receivers()


def service_file(pair):
    """The pair's service file (hA's volume VOL), which both hosts read."""
    path = os.path.join(pair.lab.workdir, 'comp.cfg')
    with open(path, 'w') as f:
        f.write('[btrfs#data]\nvolume = %s\n' % VOL)
    return path


def sums(host, folder):
    return host.run('cd %s && find . -type f | sort | xargs sha256sum'
                    % folder).stdout


@lab
def test_a_partition_deleted_by_mistake_is_restored_from_a_minute_before(
        pair, slaposha_cmd):
    a, b = pair['hA'], pair['hB']
    svc = service_file(pair)
    procs = []
    try:
        pair.receiver('hB', retention='10,24,7,4')
        a.run('mkdir -p {v}/slappart0/srv {v}/slappart1 && dd if=/dev/urandom'
              ' of={v}/slappart0/srv/data.db bs=1M count=8 status=none &&'
              ' echo port=8080 > {v}/slappart0/etc.cfg'.format(v=VOL))
        original = sums(a, VOL + '/slappart0')
        assert 'data.db' in original and 'etc.cfg' in original
        # The service goes on: a writer in another partition, and the
        # owner replicating to hB every half second.
        writer = a.spawn([sys.executable, '-c', record_writer(
            VOL + '/slappart1')], name='writer', env=pair.env())
        owner, report = pair.owner('hA', token=10, interval=0.5)
        procs += [writer, owner]
        wait_for(lambda: any(r.get('sent', {}).get('hB')
                             for r in read_report(report)), 30,
                 what='a first copy on hB')
        before = time.time()
        time.sleep(62)
        a.run('rm -rf %s/slappart0' % VOL)
        deleted = time.time()

        def standby_has_the_mistake():
            newest = pair.status('hB')['newest']
            return newest and b.run(['test', '-e', '%s/%s/slappart0' % (
                SNAPDIR, newest)], check=False).returncode == 1
        wait_for(standby_has_the_mistake, 20, what='the deletion on hB')
        at = datetime.datetime.fromtimestamp(
            before, datetime.timezone.utc).isoformat()

        for host in (a, b):
            p = host.run(slaposha_cmd + ['snapshots', svc], env=pair.env())
            lines = p.stdout.splitlines()
            assert lines[0].startswith('%s: ' % VOL), p.stdout
            rows = [line.split() for line in lines[2:]]
            # time, date, name, token, host, size, unit, kept as...
            old = [r for r in rows if r[4] == 'hA' and r[3] == '10' and
                   'minutely' in ' '.join(r[7:]) and
                   parse_time(r[0] + ' ' + r[1]) <= before]
            assert old, p.stdout
            assert any('newest' in ' '.join(r[7:]) for r in rows)

        acks_before = pair.log('hA', 'writer').count('ack ')
        p = a.run(slaposha_cmd + [
            'restore', svc, '--at', at, '--path', VOL + '/slappart0',
            '--to', VOL + '/slappart0.restored'], env=pair.env())
        taken = re.search(r'taken (\S+ \S+) UTC', p.stdout).group(1)
        assert deleted - parse_time(taken) >= 60, p.stdout
        assert sums(a, VOL + '/slappart0.restored') == original
        # On the standby too, from its own copies, next to its data.
        p = b.run(slaposha_cmd + [
            'restore', svc, '--at', at, '--path', 'slappart0', '--to',
            FS + '/slappart0.restored'], env=pair.env())
        assert sums(b, FS + '/slappart0.restored') == original
        # Nothing is ever written over: a --to that exists is refused.
        p = a.run(slaposha_cmd + [
            'restore', svc, '--at', at, '--path', 'slappart0', '--to',
            VOL + '/slappart1'], env=pair.env(), check=False)
        assert p.returncode == 2 and 'exists already' in p.stderr
        assert a.run(['test', '-e', VOL + '/slappart1/slappart0'],
                     check=False).returncode == 1
        # The service never stopped: the writer and the owner ran on, and
        # the copies after the restore reached hB.
        assert writer.poll() is None and owner.poll() is None
        restored = time.time()
        wait_for(lambda: pair.log('hA', 'writer').count('ack ') >
                 acks_before + 50, 10, what='the writer going on')
        wait_for(lambda: any(r.get('sent', {}).get('hB') and
                             r['created'] > restored
                             for r in read_report(report)), 20,
                 what='a copy after the restore')
        assert [r['errors'] for r in read_report(report)
                if r.get('errors')] == []
        # The owner's status says how far back a restore can go.
        said = [r['status'] for r in read_report(report) if r.get('status')]
        oldest = re.search(r'backups: \d+ snapshot\(s\) kept here since'
                           r' (\S+ \S+) UTC', said[-1][1])
        assert oldest and parse_time(oldest.group(1)) <= before, said[-1]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@lab
def test_an_export_made_on_one_host_is_imported_on_a_fresh_one(
        pair, slaposha_cmd):
    a, b = pair['hA'], pair['hB']
    svc = service_file(pair)
    exports = os.path.join(pair.lab.workdir, 'exports')
    os.makedirs(exports)

    def run(host, *args, check=True):
        return host.run(slaposha_cmd + list(args), env=pair.env(),
                        check=check)

    def snapshot():
        return pair.py('hA', '''
            from slaposha.replication.volume import Volume
            result = Volume(%r).snapshot(10, 'hA').name
        ''' % VOL)
    a.run('mkdir -p {v}/slappart0 && dd if=/dev/urandom of={v}/slappart0/db'
          ' bs=1M count=16 status=none && echo one > {v}/slappart0/cfg'
          .format(v=VOL))
    first = snapshot()
    out = run(a, 'export', svc, '--to', exports).stdout
    assert 'exported %s' % first in out and 'full' in out
    # More writes, then an incremental export: only what changed.
    a.run('dd if=/dev/urandom of={v}/slappart0/db bs=1M count=1 seek=3'
          ' conv=notrunc status=none && echo two > {v}/slappart0/cfg &&'
          ' echo new > {v}/slappart0/added'.format(v=VOL))
    second = snapshot()
    out = run(a, 'export', svc, '--to', exports, '--incremental').stdout
    assert 'incremental after %s' % first in out, out
    files = sorted(n for n in os.listdir(exports) if n.endswith('.zst')
                   or n.endswith('.gz'))
    assert len(files) == 2
    full, incremental = [os.path.join(exports, n) for n in sorted(
        files, key=lambda n: 'after' in n)]
    assert os.path.getsize(incremental) < os.path.getsize(full) / 4
    # The checksum is the one sha256sum reads.
    assert subprocess.run(['sha256sum', '-c', os.path.basename(full) +
                           '.sha256'], cwd=exports).returncode == 0

    # A damaged copy is refused, nothing received.
    damaged = os.path.join(exports, 'damaged-' + os.path.basename(full))
    data = bytearray(open(full, 'rb').read())
    data[len(data) // 2] ^= 0xff
    open(damaged, 'wb').write(bytes(data))
    for suffix in ('.sha256', '.json'):
        with open(full + suffix) as f, open(damaged + suffix, 'w') as g:
            g.write(f.read())
    p = run(b, 'import', svc, damaged, check=False)
    assert p.returncode == 2 and 'checksum mismatch' in p.stderr
    assert p.stderr.count('\n') == 1
    # The incremental one alone cannot be imported first.
    p = run(b, 'import', svc, incremental, check=False)
    assert p.returncode == 2 and 'import that export first' in p.stderr
    assert pair.status('hB')['snapshots'] == []

    # On hB, a fresh host that never received anything: both, in order,
    # each renamed to token 0 (older than what any owner writes).
    here = [name.split('-')[0] + '-0' for name in (first, second)]
    assert 'imported %s as %s' % (first, here[0]) in run(
        b, 'import', svc, full).stdout
    assert 'imported %s as %s' % (second, here[1]) in run(
        b, 'import', svc, incremental).stdout
    assert 'already here as %s' % here[1] in run(b, 'import', svc,
                                                 incremental).stdout
    assert pair.status('hB')['snapshots'] == here
    for name, imported in zip((first, second), here):
        assert sums(b, '%s/%s' % (SNAPDIR, imported)) == \
            sums(a, '%s/%s' % (SNAPDIR, name))
    listing = run(b, 'snapshots', svc, '--no-size').stdout
    assert ' hA ' in listing and here[1] in listing
    # It is a copy like any other: promoted, it is the live data.
    pair.promote('hB')
    assert sums(b, VOL) == sums(a, VOL)
    assert b.run(['cat', VOL + '/slappart0/cfg']).stdout == 'two\n'
    # An owner of a new cluster (token 5, below the exporter's 10) writes
    # on it; the next takeover there keeps what it wrote. Under its own
    # token 10 the import outranked the owner's snapshot, and the takeover
    # promoted the import again: 'two', the owner's writes gone.
    taken, newest, said = pair.py('hB', """
        from slaposha.replication.volume import Volume
        v = Volume(%r)
        v.activate(5, 'hB')
        with open(%r, 'w') as f:
            f.write('three\\n')
        taken = v.snapshot(5, 'hB').name
        v.deactivate()
        said = v.activate(6, 'hB')
        v.deactivate()
        result = [taken, v.newest().name, said]
    """ % (VOL, VOL + '/slappart0/cfg'))
    assert newest == taken and 'kept' in said, said
    assert b.run(['cat', VOL + '/slappart0/cfg']).stdout == 'three\n'


@lab
def test_an_rsync_archive_made_on_one_host_is_imported_on_a_fresh_one(
        pair, slaposha_cmd):
    a, b = pair['hA'], pair['hB']
    tree = FS + '/tree'
    svc = os.path.join(pair.lab.workdir, 'files.cfg')
    with open(svc, 'w') as f:
        f.write('[rsync#data]\npath = %s\n' % tree)
    exports = os.path.join(pair.lab.workdir, 'exports')
    os.makedirs(exports)

    def run(host, *args, check=True):
        return host.run(slaposha_cmd + list(args), env=pair.env(),
                        check=check)

    # On hA, where the service runs: a subvolume, archived from a
    # read-only snapshot of it; owners, modes, links kept.
    a.run('btrfs subvolume create {t} >/dev/null && mkdir -p {t}/slappart0/'
          'srv && dd if=/dev/urandom of={t}/slappart0/srv/db bs=1M count=4'
          ' status=none && echo port=8080 > {t}/slappart0/etc.cfg && chown'
          ' 1234:2345 {t}/slappart0/etc.cfg && chmod 640 {t}/slappart0/'
          'etc.cfg && ln -s srv/db {t}/slappart0/db.link && ln {t}/slappart0/'
          'srv/db {t}/slappart0/db.hard'.format(t=tree))
    p = run(a, 'export', svc, '--to', exports, '--incremental', check=False)
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and \
        'is exported whole' in p.stderr, p.stderr
    out = run(a, 'export', svc, '--to', exports).stdout
    assert 'a tar archive of a read-only snapshot of the folder' in out, out
    archive = [os.path.join(exports, n) for n in os.listdir(exports)
               if '.tar.' in n and n.endswith(('.zst', '.gz'))]
    assert len(archive) == 1 and a.run(
        ['btrfs', 'subvolume', 'list', FS]).stdout.count('export-') == 0
    assert subprocess.run(['sha256sum', '-c', os.path.basename(archive[0]) +
                           '.sha256'], cwd=exports).returncode == 0
    # A btrfs service cannot read it.
    p = run(b, 'import', service_file(pair), archive[0], check=False)
    assert p.returncode == 2 and 'no [rsync#...] data' in p.stderr

    # On hB, a fresh host: into the tree's store as its newest copy, of
    # token 0; promoted, the files are the same, owners and links too.
    out = run(b, 'import', svc, archive[0]).stdout
    assert 'as its newest copy, token 0' in out, out
    assert b.run(['test', '-e', tree], check=False).returncode == 1
    said = pair.py('hB', '''
        from slaposha.replication.tree import Tree
        result = Tree(%r).promote()
    ''' % tree)
    assert 'promoted the copy of hA (token 0' in said, said
    assert sums(b, tree) == sums(a, tree)

    def shape(host):
        return host.run('cd %s && find . -printf "%%p %%U:%%G %%m %%n %%l\\n"'
                        ' | sort' % tree).stdout
    assert shape(b) == shape(a) and ' 1234:2345 640 ' in shape(b)
