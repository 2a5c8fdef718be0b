"""The re6st driver: the node's re6st config and state saved into the
replicated data by the owner and installed by a new owner, the daemon in
the resource's cgroup.

re6st itself needs a registry outside the lab (it fetches the network's
parameters and peers from it at start), so the daemon here is a STAND-IN
(``STANDIN``): a small program that reads re6stnet.conf as re6stnet does,
checks the key is 0600, adds the node's address ``<prefix>::1`` from the
certificate's common name on the main interface as re6stnet does, keeps an
identity and a counter in a SQLite cache.db in the state folder, and keeps
running until SIGTERM (then it removes its address, as re6stnet does)."""

import os
import random
import re
import shutil
import sqlite3
import stat
import textwrap
import threading
import time

import pytest

from slaposha import config
from slaposha.lab.cluster import LabCluster, marked_pids
from slaposha.lab.replication import LAB_PATHS, VOL, ReplicationLab
from slaposha.cgroup import Cgroup, cgroup2_mount
from slaposha.config import ConfigError
from slaposha.lab import wait_for
from slaposha.resources import DOWN, WARN, driver
from slaposha.resources.re6st import (
    install_copy, node_addresses, read_conf, save_copy, saved_meta)
from slaposha.service import Context

PREFIX = 'fd42:6e6:1:2::/64'
ADDRESS = 'fd42:6e6:1:2::1/64'

STANDIN = textwrap.dedent('''\
    import os, signal, sqlite3, subprocess, sys, time, uuid
    conf = {}
    for line in open(sys.argv[1].lstrip('@')):
        line = line.split('#')[0].strip()
        if line:
            name, _, value = line.partition(' ')
            conf[name] = value.strip()
    if os.stat(conf['key']).st_mode & 0o077:
        sys.exit('error: %s is readable by others' % conf['key'])
    cn = open(conf['cert']).read().split('CN=')[1].split()[0]
    net, length = cn.split('/')
    address = '%s1/%s' % (net, length)
    dev = conf.get('main-interface', 'lo')
    if conf.get('registry') != 'none':
        subprocess.run(['ip', '-6', 'addr', 'add', address, 'dev', dev],
                       check=True)
    state = conf.get('state', '/var/lib/re6stnet')
    os.makedirs(state, exist_ok=True)
    path = os.path.join(state, 'identity')
    if not os.path.exists(path):
        with open(path, 'w') as f:
            f.write(uuid.uuid4().hex)
    db = sqlite3.connect(os.path.join(state, 'cache.db'))
    db.execute('create table if not exists counter (n integer)')
    n = db.execute('select max(n) from counter').fetchone()[0] or 0
    print('found', n, open(path).read(), flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    while not stopping:
        n += 1
        db.execute('insert into counter values (?)', (n,))
        db.commit()
        time.sleep(0.05)
    if conf.get('registry') != 'none':
        subprocess.run(['ip', '-6', 'addr', 'del', address, 'dev', dev])
''')


def write_config(folder, registry='http://re6st.lab.invalid/', key_mode=0o600,
                 state='/var/lib/re6stnet', at=None):
    """What re6st-conf leaves in /etc/re6stnet, with a fake certificate
    whose common name is the node's prefix; ``at``: the folder's path as
    the daemon sees it (in a lab host)."""
    os.makedirs(folder, exist_ok=True)
    at = at or folder
    with open(os.path.join(folder, 're6stnet.conf'), 'w') as f:
        f.write('# written by re6st-conf\nregistry %s\nca %s/ca.crt\n'
                'cert %s/cert.crt\nkey %s/cert.key\nstate %s\n'
                'main-interface lo\n' % (registry, at, at, at, state))
    with open(os.path.join(folder, 'ca.crt'), 'w') as f:
        f.write('fake CA\n')
    with open(os.path.join(folder, 'cert.crt'), 'w') as f:
        f.write('fake certificate CN=%s\n' % PREFIX)
    fd = os.open(os.path.join(folder, 'cert.key'),
                 os.O_WRONLY | os.O_CREAT, key_mode)
    os.write(fd, b'fake key\n')
    os.close(fd)
    os.chmod(os.path.join(folder, 'cert.key'), key_mode)


def load(tmp_path, text):
    path = tmp_path / 'svc.cfg'
    path.write_text(textwrap.dedent(text))
    return config.load_service(str(path))


# -- configuration -----------------------------------------------------------

def test_bad_sections_are_one_line_naming_the_key(tmp_path):
    for text, words in [
            ('[re6st#net]\n', '[re6st#net]: data: needed'),
            ('[re6st#net]\ndata = srv/copy\n', '[re6st#net] data: expected'
             ' an absolute path'),
            ('[re6st#net]\ndata = /etc/re6stnet/copy\n',
             '[re6st#net]: data: must be outside config /etc/re6stnet'),
            ('[re6st#net]\ndata = /var/lib\n',
             '[re6st#net]: data: must be outside state /var/lib/re6stnet'),
            ('[re6st#net]\ndata = /srv/d\nstate = /etc/re6stnet/s\n',
             '[re6st#net]: state: must not be config or inside it'),
            ('[re6st#net]\ndata = /srv/d\nsave_interval = 0.1\n',
             '[re6st#net] save_interval: must be at least 1.0')]:
        with pytest.raises(ConfigError) as info:
            load(tmp_path, text)
        message = str(info.value)
        assert words in message, message
        assert '\n' not in message
    good, = load(tmp_path, '[re6st#net]\ndata = /srv/slapgrid/.slaposha/re6st'
                 '\n').resources
    res = driver('re6st')(good, Context('svc', Cgroup('/nonexistent'),
                                        str(tmp_path)))
    assert res.conf.command == 're6stnet @/etc/re6stnet/re6stnet.conf'
    assert (good.config, good.state, good.save_interval) == (
        '/etc/re6stnet', '/var/lib/re6stnet', 10.0)
    assert res.fence_targets() == (['/nonexistent/re6st.net'], [])
    derived, = load(tmp_path, '[re6st#net]\ncfg = %s\n' % (
        tmp_path / 'slapos.cfg')).resources
    (tmp_path / 'slapos.cfg').write_text(
        '[slapos]\ncomputer_id = COMP-1\ninstance_root = /srv/slapgrid\n'
        'software_root = /opt/slapgrid\n')
    assert driver('re6st')(derived, None).data() == \
        '/srv/slapgrid/.slaposha/re6st'


def test_read_conf_as_re6stnet_reads_its_file(tmp_path):
    write_config(str(tmp_path))
    conf = read_conf(str(tmp_path / 're6stnet.conf'))
    assert conf['main-interface'] == ['lo']
    assert conf['key'] == ['%s/cert.key' % tmp_path]
    assert 'written' not in str(conf)


def test_node_address_is_the_prefix_first_address():
    # Nothing is added: only the filter is read here (lo of this machine
    # has no global IPv6 address of re6st's form).
    assert node_addresses('no-such-interface') == []
    assert all(a.endswith('/128') is False for a, d in node_addresses('lo'))


# -- the copy ----------------------------------------------------------------

def test_save_then_install_keeps_modes_owners_and_local_files(tmp_path):
    owner, new = tmp_path / 'owner', tmp_path / 'new'
    data = str(tmp_path / 'data')
    write_config(str(owner / 'etc'), key_mode=0o644)  # fixed to 0600
    os.makedirs(str(owner / 'state' / 'sub'))
    (owner / 'state' / 'babeld.state').write_text('babel 1\n')
    (owner / 'state' / 'sub' / 'x').write_text('x')
    os.chown(str(owner / 'state' / 'babeld.state'), 12345, 23456)
    os.chmod(str(owner / 'state'), 0o750)
    db = sqlite3.connect(str(owner / 'state' / 'cache.db'))
    db.execute('create table peer (prefix text)')
    db.execute("insert into peer values ('0/16')")
    db.commit()
    # An open write transaction: the copy is the last committed state.
    db.execute("insert into peer values ('uncommitted')")
    folders = {'config': str(owner / 'etc'), 'state': str(owner / 'state')}
    assert install_copy(data, folders) is None  # nothing saved yet
    assert saved_meta(data) == {}
    meta = save_copy(data, folders, extra={'address': [ADDRESS, 'lo']})
    db.rollback()
    db.close()
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert saved_meta(data) == meta and meta['address'] == [ADDRESS, 'lo']
    assert os.readlink(os.path.join(data, 'current')) == 'a'
    # The next copy goes beside it, then takes its place.
    (owner / 'state' / 'babeld.state').write_text('babel 2\n')
    os.remove(str(owner / 'state' / 'sub' / 'x'))
    save_copy(data, folders)
    assert os.readlink(os.path.join(data, 'current')) == 'b'
    assert not os.path.exists(os.path.join(data, 'b', 'state', 'sub', 'x'))

    os.makedirs(str(new / 'etc'))
    (new / 'etc' / 'local.conf').write_text('this host only\n')
    (new / 'etc' / 'ca.crt').write_text('older CA\n')
    kept = install_copy(data, {'config': str(new / 'etc'),
                               'state': str(new / 'state')})
    assert kept == [str(new / 'etc' / 'local.conf')]
    assert (new / 'etc' / 'local.conf').read_text() == 'this host only\n'
    assert (new / 'etc' / 'ca.crt').read_text() == 'fake CA\n'
    assert (new / 'state' / 'babeld.state').read_text() == 'babel 2\n'
    st = os.stat(str(new / 'state' / 'babeld.state'))
    assert (st.st_uid, st.st_gid) == (12345, 23456)
    assert stat.S_IMODE(os.stat(str(new / 'state')).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(str(new / 'etc' / 'cert.key')).st_mode) \
        == 0o600
    rows = sqlite3.connect(str(new / 'state' / 'cache.db')).execute(
        'select prefix from peer').fetchall()
    assert rows == [('0/16',)]


def test_saves_go_on_while_the_daemon_writes_its_databases(tmp_path):
    # re6st commits to its SQLite cache all the time: a journal file that
    # vanishes while rsync lists the folder is not a failed save, and no
    # journal or WAL is copied beside the database's own consistent copy.
    state = tmp_path / 'state'
    config = tmp_path / 'etc'
    write_config(str(config))
    os.makedirs(str(state))
    data = str(tmp_path / 'data')
    path = str(state / 'cache.db')
    sqlite3.connect(path).execute('create table peer (n integer)').connection\
        .commit()
    stop = threading.Event()
    written = []

    def writer():
        db = sqlite3.connect(path)
        n = 0
        while not stop.is_set():
            n += 1
            db.execute('insert into peer values (?)', (n,))
            db.commit()
            written.append(n)
        db.close()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(12):
            save_copy(data, {'config': str(config), 'state': str(state)})
    finally:
        stop.set()
        thread.join()
    copied = os.listdir(os.path.join(data, 'current', 'state'))
    assert copied == ['cache.db'], copied
    rows = sqlite3.connect(os.path.join(data, 'current', 'state',
                                        'cache.db')).execute(
        'select count(*) from peer').fetchone()[0]
    assert 0 < rows <= len(written)


def test_a_missing_config_is_named_and_the_last_copy_stays(tmp_path):
    data = str(tmp_path / 'data')
    write_config(str(tmp_path / 'etc'))
    folders = {'config': str(tmp_path / 'etc'),
               'state': str(tmp_path / 'no-state-yet')}
    save_copy(data, folders)
    assert os.listdir(os.path.join(data, 'current', 'state')) == []
    folders['config'] = str(tmp_path / 'gone')
    with pytest.raises(Exception) as info:
        save_copy(data, folders)
    assert 'config: %s is not a folder' % (tmp_path / 'gone') in \
        str(info.value)
    assert os.path.exists(os.path.join(data, 'current', 'config',
                                       're6stnet.conf'))


# -- the daemon --------------------------------------------------------------

needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or cgroup2_mount() is None,
    reason='the daemon runs in a cgroup: needs root and a cgroup v2'
    ' hierarchy')


@pytest.fixture
def make_re6st(tmp_path):
    """re6st drivers on temporary folders, with the stand-in as daemon
    (registry none: it adds no address on this machine)."""
    base = Cgroup(os.path.join(cgroup2_mount() or '/nonexistent',
                               'slaposha-test', 're6st-%d-%04x' % (
                                   os.getpid(), random.randrange(0x10000))))
    script = tmp_path / 'standin.py'
    script.write_text(STANDIN)

    def make(name, **keys):
        # The same paths on every host, as on real peers.
        folder = tmp_path / 'node'
        values = dict(config=str(folder / 'etc'), state=str(folder / 'state'),
                      data=str(tmp_path / 'data'), save_interval='1',
                      settle='0.3', command='exec python3 -u %s @%s' % (
                          script, folder / 'etc' / 're6stnet.conf'))
        values.update(keys)
        text = '[re6st#net]\n' + ''.join('%s = %s\n' % kv
                                         for kv in sorted(values.items()))
        section, = load(tmp_path, text).resources
        return driver('re6st')(section, Context('svc', base.child(name),
                                                str(tmp_path / 'log')))
    try:
        yield make
    finally:
        base.kill()
        base.remove()
        try:
            os.rmdir(os.path.dirname(base.path))
        except OSError:
            pass


def counter(folder):
    db = sqlite3.connect(os.path.join(folder, 'cache.db'))
    try:
        return db.execute('select max(n) from counter').fetchone()[0] or 0
    finally:
        db.close()


@needs_cgroups
def test_owner_saves_in_the_background_and_a_new_owner_goes_on(
        make_re6st, tmp_path):
    first = make_re6st('first')
    write_config(first.conf.config, registry='none',
                 state=first.conf.state)
    first.start()
    assert first.cgroup.pids()
    state, message = first.status()
    # The stand-in adds no address here: running, but not yet routed.
    assert state == WARN and 'daemon running' in message and \
        'no re6st address on lo yet' in message, message
    began = time.monotonic()
    first.tick()  # not due yet
    assert first._worker is None
    wait_for(lambda: first.tick() or saved_meta(first.conf.data), 3,
             interval=0.05, what='a save from tick')
    assert time.monotonic() - began < 3
    identity = open(os.path.join(first.conf.state, 'identity')).read()
    first.stop()
    assert not first.cgroup.exists()
    assert first.status() == (DOWN, 'the daemon is not running')
    stopped_at = counter(first.conf.state)
    # The copy made at stop has every committed record.
    saved = os.path.join(first.conf.data, 'current', 'state')
    assert counter(saved) == stopped_at > 0

    # Another host: neither config nor state there.
    shutil.rmtree(first.conf.config)
    shutil.rmtree(first.conf.state)
    second = make_re6st('second')
    second.start()
    assert open(os.path.join(second.conf.state, 'identity')).read() == \
        identity
    assert stat.S_IMODE(os.stat(os.path.join(
        second.conf.config, 'cert.key')).st_mode) == 0o600
    wait_for(lambda: counter(second.conf.state) > stopped_at + 3, 3,
             what='the stand-in counting on')
    log = open(second.log_path()).read()
    assert 'found %d %s' % (stopped_at, identity) in log, log
    state, message = second.status()
    assert 'saved' in message and 'ago' in message, message
    second.fence()
    assert not second.cgroup.pids()


@needs_cgroups
def test_the_daemon_failing_is_reported_not_raised_further(make_re6st):
    # settle: long enough for Python to start on a loaded machine.
    bad = make_re6st('bad', settle='5')
    write_config(bad.conf.config, registry='none', key_mode=0o600,
                 state=bad.conf.state)
    os.chmod(os.path.join(bad.conf.config, 'cert.key'), 0o644)
    # The copy would make it 0600 again; without one the stand-in refuses.
    with pytest.raises(Exception) as info:
        bad.start()
    message = str(info.value)
    assert 're6st#net: the daemon exited with code 1' in message, message
    assert 'readable by others' in message, message
    state, message = bad.status()
    assert state == DOWN and 'exited with code 1' in message, message
    bad.stop()  # nothing to stop: no error; a last copy is saved
    assert saved_meta(bad.conf.data)

    # No saved copy and no re6stnet.conf: nothing to start.
    missing = make_re6st('missing', command='',
                         data=bad.conf.data + '-none')
    os.remove(os.path.join(missing.conf.config, 're6stnet.conf'))
    with pytest.raises(Exception) as info:
        missing.start()
    assert 'config: %s/re6stnet.conf is missing' % missing.conf.config in \
        str(info.value)
    write_config(missing.conf.config, registry='none')
    with pytest.raises(Exception) as info:
        missing.start()  # re6stnet is not installed here
    assert 're6st#net: command exited at once with code 127' in \
        str(info.value) and 'not found' in str(info.value), str(info.value)


# -- in the lab --------------------------------------------------------------

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = 0.5
    [re6st#net]
    data = %s/.slaposha/re6st
    command = exec python3 -u %s @/etc/re6stnet/re6stnet.conf
    save_interval = 1
'''


def resource_line(lc, host, rid):
    out = lc.cli(host, 'status', check=False).stdout
    return next((line for line in out.splitlines() if rid in line), '')


@pytest.mark.lab
def test_takeover_moves_the_daemon_its_config_and_state(make_lab):
    """hA owns the node; its re6st daemon (the stand-in: re6st needs an
    outside registry) runs with /etc/re6stnet and keeps its state; hA
    crashes; hB takes over with the same config and the state hA saved,
    and the node's re6st address is on hB."""
    lab = make_lab(['hA', 'hB', 'hW'], paths=LAB_PATHS + (
        '/etc/re6stnet', '/var/lib/re6stnet'))
    ReplicationLab(lab, disk_size='256M')
    standin = os.path.join(lab.workdir, 're6st-standin.py')
    with open(standin, 'w') as f:
        f.write(STANDIN)
    write_config(lab['hA'].path('/etc/re6stnet'), at='/etc/re6stnet')
    # hB has a file of its own there: kept, and the log says so.
    with open(lab['hB'].path('/etc/re6stnet') + '/local.conf', 'w') as f:
        f.write('hB only\n')
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, services={
        'node': SERVICE % (VOL, VOL, standin)}, settings='''
                    [agent]
                    monitor_interval = 0.5
                    ''').start()
    try:
        def saved_on_ha():
            line = resource_line(lc, 'hA', 're6st#net')
            return ' up ' in line and 'saved' in line and line
        line = wait_for(saved_on_ha, 40, interval=0.5,
                        what='the daemon up on hA, its state saved')
        assert 'node address %s on lo' % ADDRESS in line, line
        state_a = lab['hA'].path('/var/lib/re6stnet')
        identity = open(state_a + '/identity').read()
        time.sleep(2)  # a save and a snapshot of it
        lab.crash('hA')
        crashed = time.monotonic()
        counted = counter(state_a)
        assert counted > 20, counted
        wait_for(lambda: lc.owner('node', 'hW')[0] == 'hB', 30,
                 interval=0.2, what='hB owning the node')
        log = lab['hB'].path('/var/lib/slaposha/log') + '/node.re6st.net.log'

        def found():
            try:
                for text in open(log):
                    if text.startswith('found '):
                        return text.split()[1:]
            except OSError:
                return None
        n, seen = wait_for(found, 30, interval=0.2, what='the stand-in on hB')
        took = time.monotonic() - crashed
        # The state it had saved: the same identity, a counter no older
        # than a save interval and a snapshot interval (20 a second).
        assert seen == identity
        assert 0 < counted - int(n) <= 2.5 * 20 + 20, (counted, n)
        etc_a, etc_b = (lab[h].path('/etc/re6stnet') for h in ('hA', 'hB'))
        for name in ('re6stnet.conf', 'cert.crt', 'cert.key', 'ca.crt'):
            assert open(os.path.join(etc_b, name)).read() == \
                open(os.path.join(etc_a, name)).read()
        assert stat.S_IMODE(os.stat(etc_b + '/cert.key').st_mode) == 0o600
        assert open(etc_b + '/local.conf').read() == 'hB only\n'
        assert 'kept 1 local file(s) that the copy lacks: ' \
            '/etc/re6stnet/local.conf' in lc.log('hB')
        assert ADDRESS in lab['hB'].run(['ip', '-6', 'addr', 'show', 'dev',
                                         'lo']).stdout
        line = wait_for(lambda: ' up ' in resource_line(
            lc, 'hB', 're6st#net') and resource_line(lc, 'hB', 're6st#net'),
            20, interval=0.5, what='re6st#net up on hB')
        assert 'node address %s on lo' % ADDRESS in line, line

        def saved_by_hb():  # the new owner saves in its turn
            line = resource_line(lc, 'hB', 're6st#net')
            m = re.search(r'saved ([0-9.]+) s ago', line)
            return m and float(m.group(1)) < 2 and line
        wait_for(saved_by_hb, 10, interval=0.5, what='a save by hB')
        assert marked_pids(lab['hA'], 're6st-standin') == []
        print('re6st on hB %.1f s after the crash; %d counted on hA, %s'
              ' found on hB' % (took, counted, n))
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
