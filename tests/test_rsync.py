"""The rsync data driver and its engine against the real thing: the real
rsync binary between two lab hosts, relayed over the TLS channel with
certificates of a throw-away CA. The tree is /srv/slapgrid/data, each
host's own (the lab's /srv/slapgrid is on the root file system, not btrfs:
these copies are live ones)."""

import json
import os
import sys
import textwrap
import time

import pytest

from slaposha import config
from slaposha.cgroup import Cgroup
from slaposha.config import ConfigError
from slaposha.lab import wait_for
from slaposha.lab.cluster import TOP, make_test_pki
from slaposha.resources import ResourceError, WARN, driver
from slaposha.service import Context

lab = pytest.mark.lab

TREE = '/srv/slapgrid/data'
STORE = '/srv/slapgrid/.slaposha-rsync/data'
PORT = 1216


# -- without the lab ------------------------------------------------------------

def load(tmp_path, text):
    path = tmp_path / 'svc.cfg'
    path.write_text(textwrap.dedent(text))
    return config.load_service(str(path))


def test_rsync_section_keys_and_defaults(tmp_path):
    section, = load(tmp_path, """
        [rsync#data]
        path = /srv/slapgrid/data
    """).resources
    assert (section.path, section.store, section.port, section.interval,
            section.source, section.max_lag, section.timeout) == (
        '/srv/slapgrid/data', None, 1216, 10.0, 'auto', None, 60.0)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, '[rsync#data]\npath = /srv/x\nsource = lvm\n')
    assert str(e.value).endswith('[rsync#data] source: expected one of auto,'
                                 " snapshot, live, stopped (got 'lvm')")
    with pytest.raises(ConfigError) as e:
        load(tmp_path, '[rsync#data]\npath = /srv/x\nstore = /srv/x/s\n')
    assert str(e.value).endswith('[rsync#data]: store: must be outside path'
                                 ' (/srv/x)')
    with pytest.raises(ConfigError) as e:
        load(tmp_path, '[rsync#data]\ninterval = 2s\n')
    assert str(e.value).endswith('[rsync#data] path: required key is'
                                 ' missing')


def make(tmp_path, extra=''):
    section, = load(tmp_path, '[rsync#data]\npath = %s\n%s' % (
        tmp_path / 'data', extra)).resources
    return driver('rsync')(section, Context('svc', Cgroup(str(tmp_path)),
                                            str(tmp_path)))


def test_live_copy_status_says_not_crash_consistent(tmp_path):
    res = make(tmp_path)
    with pytest.raises(ResourceError) as e:
        res.start()
    assert str(e.value) == 'rsync#data: no fencing token: the agent calls' \
        ' configure(token, peers, tls, host) before start'
    res.configure(7, {}, ('ca', 'cert', 'key'), 'hA')
    res.start()
    try:
        assert os.path.isdir(str(tmp_path / 'data'))
        state, message = res.status()
        assert state == WARN
        assert message.endswith('live rsync: not crash-consistent (a database'
                                ' written during a copy can come out torn)')
        # A source = snapshot tree that is no btrfs subvolume is refused.
        with pytest.raises(ResourceError) as e:
            make(tmp_path, 'source = snapshot\n')._mode()
        assert 'is not a btrfs subvolume' in str(e.value)
    finally:
        res.stop()
    assert res.status() == ('down', 'not replicating on this host')


def test_what_a_crash_left_half_deleted_is_deleted_when_the_receiver_starts(
        tmp_path):
    from slaposha.replication.receiver import TreeReceiver
    from slaposha.replication.tree import Tree
    tree = Tree(str(tmp_path / 'data'), str(tmp_path / 'store'))
    trash = tmp_path / 'store' / 'trash-1764000000-a1b2c3'
    (trash / 'deep').mkdir(parents=True)
    (trash / 'deep' / 'file').write_text('x' * 1000)
    (tmp_path / 'store' / 'a').mkdir()  # a copy: kept
    TreeReceiver([tree], copy_roots=())
    wait_for(lambda: not trash.exists(), 10, interval=0.05,
             what='the trash deleted')
    assert sorted(os.listdir(tmp_path / 'store')) == ['a']


def test_receiver_runs_only_a_checked_push():
    from slaposha.replication.receiver import server_command
    cmd = server_command(['rsync', '--server', '-logDtpre.iLsfxCIvu',
                          '--delete', '--stats', '--numeric-ids',
                          '--timeout=5', '.', '/etc/'], '/store/a', '/store/b')
    assert cmd[1:] == ['--server', '-logDtpre.iLsfxCIvu', '--delete',
                       '--stats', '--numeric-ids', '--timeout=5',
                       '--copy-dest=/store/b', '.', '/store/a/']
    for bad, why in ((['--sender'], 'only pushes'),
                     (['--remove-source-files'], 'is not served'),
                     (['--log-file=/etc/x'], 'is not served')):
        with pytest.raises(ValueError) as e:
            server_command(['rsync', '--server'] + bad + ['.', 'x'], '/s')
        assert why in str(e.value)


# -- in the lab -------------------------------------------------------------------

class Pair(object):
    """Two lab hosts with certificates and a receiver on hB."""

    def __init__(self, lab, idle_timeout=30):
        self.lab = lab
        self.ssl_dir = os.path.join(lab.workdir, 'ssl')
        make_test_pki(self.ssl_dir, {h.name: h.address for h in lab})
        b = lab['hB']
        self.receiver = b.spawn([
            sys.executable, '-m', 'slaposha.replication', 'receiver',
            '--host', 'hB', '--listen', b.address, '--ssl-dir', self.ssl_dir,
            '--idle-timeout', str(idle_timeout), '--tree', TREE],
            name='receiver', env=self.env())
        wait_for(lambda: 'listening on' in self.log(), 10,
                 what='the receiver of hB')
        lab['hA'].run(['mkdir', '-p', TREE])

    def env(self):
        return dict(os.environ, PYTHONPATH=TOP, PYTHONUNBUFFERED='1')

    def log(self):
        try:
            with open(self.receiver.log_path, errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def stop(self):
        if self.receiver.poll() is None:
            self.receiver.terminate()
            self.receiver.wait(5)

    def py(self, name, code, timeout=120):
        script = 'import json\nresult = None\n' + textwrap.dedent(code) + \
            '\nprint(json.dumps(result))\n'
        p = self.lab[name].run([sys.executable, '-c', script],
                               env=self.env(), timeout=timeout)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def push_code(self, token):
        return '''
            from slaposha.replication import Peer, ReplicationError
            from slaposha.replication.push import push
            tls = [%(ssl)r + '/ca.crt', %(ssl)r + '/hA.crt',
                   %(ssl)r + '/hA.key']
            try:
                result = push(%(tree)r, Peer('hB', %(address)r, %(port)d),
                              tls, 'hA', %(token)d, timeout=5)._asdict()
            except ReplicationError as e:
                result = {'error': str(e), 'class': type(e).__name__}
        ''' % {'ssl': self.ssl_dir, 'tree': TREE, 'port': PORT,
               'address': self.lab['hB'].address, 'token': token}

    def push(self, token):
        return self.py('hA', self.push_code(token))

    def status(self):
        return self.py('hB', '''
            from slaposha.replication.tree import Tree
            result = Tree(%r).status()
        ''' % TREE)

    def copy_file(self, name, relative):
        """The bytes of the complete copy's ``relative`` file on ``name``."""
        status = self.status()
        assert status['newest'], status
        state = self.py(name, '''
            from slaposha.replication.tree import Tree
            result = Tree(%r).state()['complete']
        ''' % TREE)
        with open(self.lab[name].path('%s/%s/%s' % (STORE, state, relative)),
                  'rb') as f:
            return f.read()


@pytest.fixture
def pair(make_lab):
    p = Pair(make_lab(['hA', 'hB']))
    try:
        yield p
    finally:
        p.stop()


@lab
def test_copy_arrives_and_the_standby_knows_its_age(pair):
    a = pair.lab['hA']
    a.run('echo one > %s/file && mkdir -p %s/sub && head -c 3000000'
          ' /dev/urandom > %s/sub/blob' % (TREE, TREE, TREE))
    before = time.time()
    first = pair.push(20)
    assert 'error' not in first, first
    assert first['bytes'] > 3e6 and first['mode'] == 'live'
    assert before <= first['created'] <= time.time()
    assert pair.copy_file('hB', 'file') == b'one\n'
    with open(a.path(TREE + '/sub/blob'), 'rb') as f:
        assert pair.copy_file('hB', 'sub/blob') == f.read()
    status = pair.status()
    assert status['newest']['token'] == 20 and status['token'] == 20
    assert status['newest']['host'] == 'hA'
    assert 0 <= status['lag'] < time.time() - first['created']
    # No live folder on a standby until it takes over.
    assert status['exists'] is False
    # An unchanged blob is not sent again (copied locally on hB).
    a.run('echo two > %s/file' % TREE)
    second = pair.push(20)
    assert second['bytes'] < 100000, second
    assert pair.copy_file('hB', 'file') == b'two\n'
    # The age is counted from when the data was taken (the start of the
    # transfer), whenever it is asked: that is what max_lag compares.
    for _ in range(2):
        asked = time.time()
        status = pair.status()
        answered = time.time()
        assert abs(status['newest']['created'] - second['created']) < 1e-3
        assert asked - second['created'] - 0.01 <= status['lag'] <= \
            answered - second['created'] + 0.01


@lab
def test_a_file_rewritten_within_the_same_second_is_sent(pair):
    """Same size, same second: rsync's default quick check (whole-second
    mtimes) would keep the old content on the standby for good."""
    a = pair.lab['hA']
    second = int(time.time())
    for n, content in ((1, 'v1'), (2, 'v2')):
        a.run(['python3', '-c', 'import os; open(%r, "w").write(%r);'
               ' os.utime(%r, ns=(%d, %d))' % (
                   TREE + '/file', content, TREE + '/file',
                   second * 10**9 + n * 100, second * 10**9 + n * 100)])
        done = pair.push(20)
        assert 'error' not in done, done
        assert pair.copy_file('hB', 'file') == content.encode()


@lab
def test_a_transfer_with_a_stale_token_is_refused(pair):
    a = pair.lab['hA']
    a.run('echo new owner > %s/file' % TREE)
    assert 'error' not in pair.push(20)
    before = pair.status()['newest']
    a.run('echo stale owner > %s/file' % TREE)
    # Sent as a deposed owner would: the request says token 10.
    stale = pair.push(10)
    assert stale['class'] == 'StaleToken', stale
    assert 'token 10 is stale: token 20 was seen here' in stale['error']
    after = pair.status()
    assert after['newest'] == before and after['token'] == 20
    assert pair.copy_file('hB', 'file') == b'new owner\n'
    assert 'refused' in pair.log() and 'stale' in pair.log()
    # An operator's certificate of the same CA is not a host's.
    from slaposha import pki
    ca_key = pki.load_key(os.path.join(pair.ssl_dir, 'ca.key'))
    ca_cert = pki.load_cert(os.path.join(pair.ssl_dir, 'ca.crt'))
    key = pki.new_key()
    pki.write_key(os.path.join(pair.ssl_dir, 'alice.key'), key)
    pki.write_cert(os.path.join(pair.ssl_dir, 'alice.crt'), pki.issue(
        ca_key, ca_cert, key.public_key(), 'alice', 'operator'))
    code = pair.push_code(30).replace("'/hA.crt'", "'/alice.crt'").replace(
        "'/hA.key'", "'/alice.key'")
    refused = pair.py('hA', code)
    assert "the certificate of alice is not a host's" in refused['error']
    assert pair.status()['token'] == 20


@lab
def test_an_interrupted_transfer_is_not_a_complete_copy(make_lab):
    pair = Pair(make_lab(['hA', 'hB']), idle_timeout=2)
    try:
        a = pair.lab['hA']
        a.run('echo v1 > %s/file' % TREE)
        first = pair.push(20)
        assert 'error' not in first, first
        a.run('echo v2 > %s/file && head -c 150000000 /dev/zero > %s/big'
              % (TREE, TREE))
        staging = pair.lab['hB'].path(STORE + '/b')

        def landed():
            total = 0
            for folder, _, files in os.walk(staging):
                for name in files:
                    try:
                        total += os.path.getsize(os.path.join(folder, name))
                    except OSError:
                        pass
            return total
        script = 'import json\nresult = None\n' + textwrap.dedent(
            pair.push_code(20)) + '\nprint(json.dumps(result))\n'
        sender = a.spawn([sys.executable, '-c', script], name='push',
                         env=pair.env())
        wait_for(lambda: landed() > 20e6, 30, interval=0.02,
                 what='a transfer half landed on hB')
        pair.lab.partition(['hA'])
        wait_for(lambda: 'transfer failed, not kept' in pair.log(), 20,
                 interval=0.1, what='hB dropping the cut transfer')
        pair.lab.heal()
        waited = time.monotonic()
        sender.wait(30)
        print('sender ended %.1f s after the heal'
              % (time.monotonic() - waited))
        asked = time.time()
        status = pair.status()
        assert abs(status['newest']['created'] - first['created']) < 1e-3
        assert status['lag'] >= asked - first['created'] - 0.01
        assert pair.copy_file('hB', 'file') == b'v1\n'
        assert not os.path.exists(pair.lab['hB'].path(STORE + '/a/big'))
        # The next transfer completes and counts.
        done = pair.push(20)
        assert 'error' not in done, done
        assert pair.copy_file('hB', 'file') == b'v2\n'
        assert pair.status()['newest']['created'] == done['created']
    finally:
        pair.stop()


@lab
def test_copy_tree_for_software_releases(pair):
    a = pair.lab['hA']
    a.run('mkdir -p /opt/slapgrid/abc/bin && echo built > '
          '/opt/slapgrid/abc/.completed && echo x > /opt/slapgrid/abc/bin/x')
    result = pair.py('hA', '''
        from slaposha.replication import Peer, ReplicationError
        from slaposha.replication.push import copy_tree
        tls = [%(ssl)r + '/ca.crt', %(ssl)r + '/hA.crt', %(ssl)r + '/hA.key']
        peer = Peer('hB', %(address)r, %(port)d)
        result = [copy_tree('/opt/slapgrid/abc', peer, '/opt/slapgrid/abc',
                            tls, 'hA')._asdict()]
        try:
            copy_tree('/opt/slapgrid/abc', peer, '/etc/cron.d', tls, 'hA')
        except ReplicationError as e:
            result.append(str(e))
    ''' % {'ssl': pair.ssl_dir, 'address': pair.lab['hB'].address,
           'port': PORT})
    assert result[0]['files'] == 2
    assert 'copies may land only below /opt/slapgrid' in result[1]
    b = pair.lab['hB']
    assert b.run(['cat', '/opt/slapgrid/abc/.completed']).stdout == \
        'built\n'
    assert b.run(['ls', '-a', '/opt/slapgrid']).stdout.split() == \
        ['.', '..', 'abc']


@lab
def test_from_a_btrfs_snapshot_and_the_copy_stays_a_subvolume(make_lab):
    from slaposha.lab.replication import (
        LAB_PATHS, VOL, ReplicationLab, remove_mount_point)
    lab = make_lab(['hA', 'hB'], paths=LAB_PATHS)
    try:
        rl = ReplicationLab(lab, disk_size='128M')
        b = lab['hB']
        receiver = b.spawn([
            sys.executable, '-m', 'slaposha.replication', 'receiver',
            '--host', 'hB', '--listen', b.address, '--ssl-dir', rl.ssl_dir,
            '--tree', VOL], name='tree-receiver', env=rl.env())
        wait_for(lambda: 'listening on' in open(receiver.log_path).read(),
                 10, what='the receiver of hB')
        lab['hA'].run('echo snap > %s/file' % VOL)
        result = rl.py('hA', '''
            import os
            from slaposha import config
            from slaposha.cgroup import Cgroup
            from slaposha.resources import driver
            from slaposha.service import Context
            with open('/tmp/svc.cfg', 'w') as f:
                f.write('[rsync#data]\\npath = %(vol)s\\n')
            section, = config.load_service('/tmp/svc.cfg').resources
            res = driver('rsync')(section, Context('svc', Cgroup('/tmp'),
                                                   '/tmp'))
            res.configure(30, {'hB': %(address)r}, %(tls)r, 'hA')
            res.start()
            res._cycle(res.mode)
            result = [res.mode, list(res.status())]
            res.stop()
            result.append(list(res.status()))
        ''' % {'vol': VOL, 'address': b.address, 'tls': rl.tls('hA')})
        assert result[0] == 'snapshot'
        assert result[1][0] == 'up' and result[1][1].startswith(
            'hB: copy ') and 'from read-only snapshots' in result[1][1], \
            result
        assert 'not crash-consistent' not in result[1][1]
        status = rl.py('hB', '''
            from slaposha.replication.tree import Tree, is_subvolume
            tree = Tree(%r)
            result = tree.status()
            result['subvolume'] = is_subvolume(
                tree.buffer(tree.state()['complete']))
        ''' % VOL)
        # The last copy is the one stop sent, the applications stopped.
        assert status['newest']['mode'] == 'stopped'
        assert status['subvolume'] is True
        receiver.terminate()
        receiver.wait(5)
    finally:
        remove_mount_point()


@lab
def test_a_crashed_owners_tree_is_kept_aside_listed_and_dropped(pair):
    """hB ran the service and wrote, then lost it (its agent gone without a
    clean stop): the newer owner's copy replaces its tree, which is kept
    aside, listed with the token that wrote it and its size, and can be
    dropped by id; the retention keeps the newest."""
    b = pair.lab['hB']
    tree = 'from slaposha.replication.tree import Tree\n' \
        'tree = Tree(%r)\n' % TREE
    for n, (mine, theirs) in enumerate(((5, 20), (30, 40), (50, 60))):
        pair.py('hB', tree + 'result = tree.activate(%d)' % mine)
        b.run('head -c 1M /dev/urandom > %s/mine-%d' % (TREE, n))
        pair.lab['hA'].run('echo %d > %s/file' % (n, TREE))
        done = pair.push(theirs)
        assert 'error' not in done, done
        said = pair.py('hB', tree + 'result = tree.promote()')
        assert 'aside' in said, said
        time.sleep(1.1)
    copies = pair.py('hB', tree + 'result = tree.diverged()')
    assert [c['token'] for c in copies] == [5, 30, 50], copies
    for copy in copies:
        assert copy['size'] >= 1 << 20, copy
        assert 'diverged-' + copy['id'] == os.path.basename(copy['path'])
    said = pair.py('hB', tree + textwrap.dedent('''
        result = [tree.drop_diverged(%r)['id'], tree.retain_diverged(keep=1),
                  [c['id'] for c in tree.diverged()]]
    ''' % copies[1]['id']))
    assert said == [copies[1]['id'], [copies[0]['id']], [copies[2]['id']]]
    for copy in copies[:2]:
        assert b.run(['test', '-e', copy['path']], check=False).returncode \
            == 1
    assert b.run(['cat', TREE + '/file']).stdout == '2\n'
