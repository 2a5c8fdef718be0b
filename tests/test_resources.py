"""The ip, fs and task drivers against the real thing: addresses and
neighbour tables in lab hosts, mounts in their mount namespaces, runs in
cgroups.

A driver acts on the namespaces of the process that runs it, as the agent
does inside its host: lab tests run each driver in a short Python process
inside the host (:func:`drive`)."""

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time

import pytest

from slaposha import config
from slaposha.cgroup import Cgroup, cgroup2_mount
from slaposha.config import ConfigError
from slaposha.lab import wait_for
from slaposha.resources import DOWN, NA, UP, WARN, ResourceError, driver
from slaposha.service import Context

from conftest import TOP

VIP4, VIP6 = '10.213.0.100', 'fd42:213::100'

# Runs in a lab host: builds the driver of one section of a service file
# and calls its verbs in order, printing each outcome as JSON.
RUNNER = textwrap.dedent('''\
    import json, os, shutil, sys, tempfile
    from slaposha import config
    from slaposha.cgroup import Cgroup
    from slaposha.resources import ResourceError, driver
    from slaposha.service import Context
    request = json.load(sys.stdin)
    folder = tempfile.mkdtemp(prefix='slaposha-test-')
    try:
        path = os.path.join(folder, 'svc.cfg')
        with open(path, 'w') as f:
            f.write(request['service'])
        section, = [s for s in config.load_service(path).resources
                    if s.rid == request['rid']]
        cls = driver(section.kind)
        problem = cls.validate(section)
        assert problem is None, problem
        res = cls(section, Context('svc', Cgroup(request['cgroup']), folder))
        out = []
        for verb in request['calls']:
            try:
                out.append({'ok': getattr(res, verb)()})
            except ResourceError as e:
                out.append({'error': str(e)})
        print(json.dumps(out))
    finally:
        shutil.rmtree(folder, True)
''')


class Failed(object):
    """A verb that raised ResourceError, with its message."""

    def __init__(self, message):
        self.message = message

    def __repr__(self):
        return '<Failed %s>' % self.message


def drive(host, service, rid, *calls):
    """Call the verbs of resource ``rid`` of the ``service`` file text in a
    new process inside ``host``; returns each one's result (a status as a
    (state, message) tuple) or Failed."""
    env = dict(os.environ, PYTHONPATH=TOP)
    request = {'service': textwrap.dedent(service), 'rid': rid,
               'calls': list(calls),
               'cgroup': os.path.join(host.cgroup.path if host.cgroup
                                      else '/nonexistent', 'svc')}
    p = host.run([sys.executable, '-c', RUNNER], input=json.dumps(request),
                 env=env)
    results = []
    for verb, item in zip(calls, json.loads(p.stdout)):
        if 'error' in item:
            results.append(Failed(item['error']))
        elif verb == 'status':
            results.append(tuple(item['ok']))
        else:
            results.append(item['ok'])
    return results if len(results) > 1 else results[0]


def mac_of(host):
    out = host.run(['ip', '-j', 'link', 'show', 'lab0']).stdout
    return json.loads(out)[0]['address']


def neighbour(host, address):
    """The MAC ``host``'s neighbour table has for ``address``, or None."""
    family = '-6' if ':' in address else '-4'
    out = host.run(['ip', family, 'neigh', 'show', address]).stdout
    m = re.search(r'lladdr (\S+)', out)
    return m.group(1) if m else None


def addresses(host):
    return host.run(['ip', 'addr', 'show', 'dev', 'lab0']).stdout


# -- ip ----------------------------------------------------------------------

IP = '''\
[ip#vip]
address = {vip4}/32 {vip6}/128
dev = lab0
announce = {announce}
check_conflict = {check}
routes = 10.9.0.0/16 via 10.213.0.254
         fd00:9::/64 via fd42:213::fe
[ip#ghost]
address = 10.213.0.101/32
dev = nosuchdev
'''


def ip_service(announce=False, check=False):
    return IP.format(vip4=VIP4, vip6=VIP6, announce=str(announce).lower(),
                     check=str(check).lower())


@pytest.mark.lab
def test_ip_start_status_stop_fence(make_lab):
    lab = make_lab(['hA', 'hC'])
    a, c = lab['hA'], lab['hC']
    text = ip_service()
    started, again, status = drive(a, text, 'ip#vip', 'start', 'start',
                                   'status')
    assert started is None and again is None  # present already: fine
    assert status[0] == UP, status
    out = addresses(a)
    assert '%s/32' % VIP4 in out and '%s/128' % VIP6 in out
    # nodad: usable at once, so programs started next can bind it.
    line, = [ln for ln in a.run(['ip', '-6', 'addr', 'show', 'dev', 'lab0'])
             .stdout.splitlines() if VIP6 in ln]
    assert 'tentative' not in line
    assert '10.213.0.254' in a.run(['ip', 'route', 'show', '10.9.0.0/16']
                                   ).stdout
    assert 'fd42:213::fe' in a.run(['ip', '-6', 'route', 'show',
                                    'fd00:9::/64']).stdout
    assert c.ping(VIP4) and c.ping(VIP6)

    # A lost route is a warning, a lost address too, naming it.
    a.run(['ip', 'route', 'del', '10.9.0.0/16'])
    state, message = drive(a, text, 'ip#vip', 'status')
    assert state == WARN and '10.9.0.0/16' in message
    a.run(['ip', 'addr', 'del', '%s/128' % VIP6, 'dev', 'lab0'])
    state, message = drive(a, text, 'ip#vip', 'status')
    assert state == WARN and VIP6 in message and VIP4 not in message

    stopped, status, again = drive(a, text, 'ip#vip', 'stop', 'status',
                                   'stop')
    assert stopped is None and again is None  # absent already: fine
    assert status[0] == DOWN, status
    out = addresses(a)
    assert VIP4 not in out and VIP6 not in out
    assert a.run(['ip', 'route', 'show', '10.9.0.0/16']).stdout == ''
    assert a.run(['ip', '-6', 'route', 'show', 'fd00:9::/64']).stdout == ''

    started, fenced, status, targets = drive(
        a, text, 'ip#vip', 'start', 'fence', 'status', 'fence_targets')
    assert fenced is None and status[0] == DOWN, status
    out = addresses(a)
    assert VIP4 not in out and VIP6 not in out
    assert targets == [[], [['%s/32' % VIP4, 'lab0'],
                            ['%s/128' % VIP6, 'lab0']]]

    failed, status = drive(a, text, 'ip#ghost', 'start', 'status')
    assert isinstance(failed, Failed)
    assert failed.message.startswith('ip#ghost: ')
    assert 'nosuchdev' in failed.message and '\n' not in failed.message
    assert status[0] == DOWN and 'does not exist' in status[1]


@pytest.mark.lab
def test_announcements_move_the_neighbours_at_once(make_lab):
    """hC learns the address at hA's MAC. When it moves to hB without
    announcements, hC still sends to hA; with them, hC's entry shows hB's
    MAC at once, although hC sent nothing."""
    lab = make_lab(['hA', 'hB', 'hC'])
    a, b, c = lab['hA'], lab['hB'], lab['hC']
    mac = {h.name: mac_of(h) for h in (a, b)}
    quiet, loud = ip_service(), ip_service(announce=True)

    def entries():
        return neighbour(c, VIP4), neighbour(c, VIP6)

    drive(a, quiet, 'ip#vip', 'start')
    assert c.ping(VIP4) and c.ping(VIP6)
    assert entries() == (mac['hA'], mac['hA'])

    # Control: moved without announcements, hC's entries stay on hA.
    drive(a, quiet, 'ip#vip', 'stop')
    drive(b, quiet, 'ip#vip', 'start')
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert entries() == (mac['hA'], mac['hA'])
        time.sleep(0.05)

    drive(b, quiet, 'ip#vip', 'stop')
    drive(a, quiet, 'ip#vip', 'start')
    assert entries() == (mac['hA'], mac['hA'])
    drive(a, quiet, 'ip#vip', 'stop')
    drive(b, loud, 'ip#vip', 'start')
    wait_for(lambda: entries() == (mac['hB'], mac['hB']), 0.5, 0.02,
             "hC's entries for the moved addresses at hB's MAC")
    assert c.ping(VIP4) and c.ping(VIP6)


@pytest.mark.lab
def test_check_conflict_refuses_an_address_another_host_answers(make_lab):
    lab = make_lab(['hA', 'hB'])
    a, b = lab['hA'], lab['hB']
    text = ip_service(check=True)
    drive(a, text, 'ip#vip', 'start')
    failed, status = drive(b, text, 'ip#vip', 'start', 'status')
    assert isinstance(failed, Failed), failed
    assert 'refusing' in failed.message and mac_of(a) in failed.message
    assert VIP4 in failed.message and VIP6 in failed.message
    assert status[0] == DOWN
    # Free again: the probe finds nobody and the start goes on.
    drive(a, text, 'ip#vip', 'stop')
    assert drive(b, text, 'ip#vip', 'start') is None
    assert VIP4 in addresses(b) and VIP6 in addresses(b)


# -- fs ----------------------------------------------------------------------

BIND = '''\
[fs#x]
device = /srv/slapgrid/src
mount_point = %s
type = bind
'''

TMPFS = '''\
[fs#t]
device = tmpfs
mount_point = /srv/slapgrid/t
type = tmpfs
options = size=8m,mode=0750
'''


@pytest.mark.lab
def test_fs_bind_mount_is_the_hosts_own_and_stop_refuses_busy(make_lab):
    lab = make_lab(['hA', 'hB'])
    a, b = lab['hA'], lab['hB']
    os.makedirs(a.path('/srv/slapgrid/src'))
    with open(a.path('/srv/slapgrid/src/marker'), 'w') as f:
        f.write('from hA')
    text = BIND % '/srv/slapgrid/x'
    started, again, status = drive(a, text, 'fs#x', 'start', 'start',
                                   'status')
    assert started is None and again is None
    assert status[0] == UP, status
    assert a.run(['cat', '/srv/slapgrid/x/marker']).stdout == 'from hA'
    # Only in hA's mount namespace: not in the root's, not in hB's.
    assert os.path.isdir(a.path('/srv/slapgrid/x'))
    assert os.listdir(a.path('/srv/slapgrid/x')) == []
    assert b.run(['test', '-e', '/srv/slapgrid/x/marker'],
                 check=False).returncode != 0

    assert drive(a, text, 'fs#x', 'stop', 'status')[1][0] == DOWN
    assert a.run(['test', '-e', '/srv/slapgrid/x/marker'],
                 check=False).returncode != 0

    # A process working in it: stop refuses, naming it; fence detaches.
    drive(a, text, 'fs#x', 'start')
    user = a.spawn(['sh', '-c', 'cd /srv/slapgrid/x && touch ../ready &&'
                    ' exec sleep 30'], name='user')
    try:
        wait_for(lambda: os.path.exists(a.path('/srv/slapgrid/ready')), 5)
        stopped, status = drive(a, text, 'fs#x', 'stop', 'status')
        assert isinstance(stopped, Failed), stopped
        assert stopped.message.startswith('fs#x: ')
        assert 'busy' in stopped.message and 'sleep' in stopped.message
        assert status[0] == UP
        fenced, status = drive(a, text, 'fs#x', 'fence', 'status')
        assert fenced is None and status[0] == DOWN, status
        assert a.run(['test', '-e', '/srv/slapgrid/x/marker'],
                     check=False).returncode != 0
    finally:
        user.kill()
        user.wait()


@pytest.mark.lab
def test_fs_tmpfs_and_a_foreign_mount(make_lab):
    lab = make_lab(['hA'])
    a = lab['hA']
    os.makedirs(a.path('/srv/slapgrid/src'))
    started, status = drive(a, TMPFS, 'fs#t', 'start', 'status')
    assert started is None and status[0] == UP, status
    assert a.run(['stat', '-f', '-c', '%T', '/srv/slapgrid/t']
                 ).stdout.strip() == 'tmpfs'
    # Something else on the mount point: start names it, status warns,
    # stop leaves it alone.
    text = BIND % '/srv/slapgrid/t'
    failed, status, stopped = drive(a, text, 'fs#x', 'start', 'status',
                                    'stop')
    assert isinstance(failed, Failed) and 'tmpfs' in failed.message
    assert 'already mounted' in failed.message
    assert status[0] == WARN and 'tmpfs' in status[1]
    assert stopped is None
    assert drive(a, TMPFS, 'fs#t', 'status')[0] == UP
    assert drive(a, TMPFS, 'fs#t', 'stop', 'status')[1][0] == DOWN


@pytest.mark.lab
def test_fs_btrfs_on_a_loop_device(make_lab):
    lab = make_lab(['hA'])
    a = lab['hA']
    disk = lab.add_disk('hA', '256M')
    subprocess.run(['mkfs.btrfs', '-q', disk], check=True,
                   stdout=subprocess.DEVNULL)
    text = '[fs#data]\ndevice = %s\nmount_point = /srv/slapgrid\n' % disk
    started, status = drive(a, text, 'fs#data', 'start', 'status')
    assert started is None and status[0] == UP, status
    assert 'btrfs' in status[1]
    a.run(['touch', '/srv/slapgrid/on-btrfs'])
    assert a.run(['stat', '-f', '-c', '%T', '/srv/slapgrid']
                 ).stdout.strip() == 'btrfs'
    assert not os.path.exists(a.path('/srv/slapgrid/on-btrfs'))
    assert drive(a, text, 'fs#data', 'stop', 'status')[1][0] == DOWN
    assert a.run(['test', '-e', '/srv/slapgrid/on-btrfs'],
                 check=False).returncode != 0


# -- task --------------------------------------------------------------------

needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or cgroup2_mount() is None,
    reason='tasks run in cgroups: needs root and a cgroup v2 hierarchy')


def load(tmp_path, text):
    path = tmp_path / 'svc.cfg'
    path.write_text(textwrap.dedent(text))
    return config.load_service(str(path))


@pytest.fixture
def test_cgroup():
    """A cgroup of the test's own, below which the drivers put theirs;
    killed and removed afterwards."""
    base = Cgroup(os.path.join(cgroup2_mount(), 'slaposha-test', 'res-%d-%04x'
                               % (os.getpid(), random.randrange(0x10000))))
    try:
        yield base
    finally:
        base.kill()
        base.remove()
        try:
            os.rmdir(os.path.dirname(base.path))
        except OSError:
            pass  # another run's groups are there


def section_driver(tmp_path, base, rid, **keys):
    """The driver of the section ``rid`` with ``keys``, its cgroup below
    ``base``."""
    lines = ['[%s]' % rid] + ['%s = %s' % kv for kv in keys.items()]
    section, = load(tmp_path, '\n'.join(lines) + '\n').resources
    return driver(section.kind)(section, Context('svc', base,
                                                 str(tmp_path / 'log')))


@pytest.fixture
def make_task(tmp_path, test_cgroup):
    def make(command, schedule='10', **keys):
        return section_driver(tmp_path, test_cgroup, 'task#t',
                              command=command, schedule=schedule, **keys)
    return make


def dead(pid):
    """Gone, or a zombie that init has not reaped yet."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def ticking(task, seconds, until=None):
    """Call tick() every 0.05 s for ``seconds``, or until ``until()``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        task.tick()
        if until is not None and until():
            return True
        time.sleep(0.05)
    return False


@needs_cgroups
def test_task_runs_on_its_schedule_only_while_started(make_task, tmp_path):
    out = tmp_path / 'runs'
    task = make_task('echo run >> %s' % out, schedule='0.3')
    ticking(task, 0.5)
    assert not out.exists()  # not started: nothing runs
    state, message = task.status()
    assert state == NA and 'not scheduled' in message
    task.start()
    state, message = task.status()
    assert state == NA and 'no run yet' in message and 'next in' in message
    ticking(task, 1.2)
    state, message = task.status()
    task.stop()
    runs = out.read_text().splitlines()
    assert 3 <= len(runs) <= 5, runs
    assert state == NA and 'exit 0' in message and 'next in' in message
    assert task.status()[0] == NA
    assert not task.cgroup.exists()
    ticking(task, 0.4)
    assert len(out.read_text().splitlines()) == len(runs)
    log = open(os.path.join(task.context.log_dir, 'svc.task.t.log')).read()
    assert log.count(' run: echo run') == len(runs)


@needs_cgroups
def test_task_runs_never_overlap(make_task, tmp_path):
    out = tmp_path / 'marks'
    task = make_task('echo start >> {0}; sleep 0.5; echo end >> {0}'.format(
        out), schedule='0.3', run_at_start='true')
    task.start()
    ticking(task, 1.7)
    task.stop()
    marks = out.read_text().split()
    assert marks.count('start') >= 2, marks
    for previous, mark in zip(marks, marks[1:]):
        assert (previous, mark) != ('start', 'start'), marks


@needs_cgroups
def test_task_stop_kills_a_run_at_once(make_task):
    task = make_task('sleep 30', run_at_start='true')
    task.start()
    wait_for(lambda: task.cgroup.pids(), 2, what='the run')
    pids = task.cgroup.pids()
    state, message = task.status()
    assert state == NA and 'running since' in message
    began = time.monotonic()
    task.stop()
    assert time.monotonic() - began < 1.0
    assert not task.cgroup.exists()
    wait_for(lambda: all(map(dead, pids)), 1, what='the run killed')
    state, message = task.status()
    assert state == NA and 'not scheduled' in message


@needs_cgroups
def test_task_failure_and_timeout_are_warnings(make_task):
    failing = make_task('echo oops; exit 3', run_at_start='true')
    failing.start()
    assert ticking(failing, 2, until=lambda: failing.last is not None)
    state, message = failing.status()
    assert state == WARN and 'exit 3' in message, message
    log = open(os.path.join(failing.context.log_dir, 'svc.task.t.log')).read()
    assert 'oops' in log and 'exit 3' in log
    failing.stop()

    slow = make_task('sleep 30', run_at_start='true', timeout='0.3')
    slow.start()
    began = time.monotonic()
    assert ticking(slow, 2, until=lambda: slow.last is not None)
    assert 0.3 <= time.monotonic() - began < 1.0
    assert not slow.cgroup.pids()
    state, message = slow.status()
    assert state == WARN and 'timeout' in message, message
    slow.stop()


# -- app as another user -------------------------------------------------------

@pytest.fixture
def make_app(tmp_path, test_cgroup):
    return lambda **keys: section_driver(tmp_path, test_cgroup, 'app#a',
                                         **keys)


def ids(pid):
    """(uid, gid, supplementary gids) of a process."""
    with open('/proc/%d/status' % pid) as f:
        fields = dict(line.split(':', 1) for line in f)
    return (int(fields['Uid'].split()[0]), int(fields['Gid'].split()[0]),
            sorted(int(g) for g in fields['Groups'].split()))


@needs_cgroups
def test_app_runs_as_its_user_and_stop_and_fence_still_reach_it(make_app,
                                                                tmp_path):
    """A program that refuses root, as PostgreSQL does, runs with user =
    nobody (uid, primary group and groups of the account, as supervisord's
    user=); it is in the resource's cgroup, so stop and fence kill it,
    daemons included; start, check and stop commands run as the user
    too."""
    import grp
    import pwd
    nobody = pwd.getpwnam('nobody')
    refuses_root = '[ "$(id -u)" != 0 ] || exit 1; exec sleep 60'
    as_root = make_app(command=refuses_root)
    with pytest.raises(ResourceError, match='exited at once'):
        as_root.start()
    as_root.stop()
    app = make_app(command=refuses_root, user='nobody')
    app.start()
    try:
        assert app.status().state == UP
        pid, = app.cgroup.pids()
        assert ids(pid) == (nobody.pw_uid, nobody.pw_gid, sorted(
            set([nobody.pw_gid] + [g.gr_gid for g in grp.getgrall()
                                   if 'nobody' in g.gr_mem])))
    finally:
        app.stop()
    assert not app.cgroup.exists()
    # A numeric uid and another group; a daemon left behind is fenced.
    group = grp.getgrnam('nogroup' if 'nogroup' in
                         [g.gr_name for g in grp.getgrall()] else 'daemon')
    daemon = make_app(start='(sleep 60 &) ; echo started as $(id -u)',
                      check='[ "$(id -u)" = %d ]' % nobody.pw_uid,
                      stop='true', user=str(nobody.pw_uid),
                      group=group.gr_name)
    daemon.start()
    try:
        with open(daemon.log_path()) as f:
            assert 'started as %d' % nobody.pw_uid in f.read()
        assert daemon.status().state == UP
        pid, = daemon.cgroup.pids()
        assert ids(pid)[:2] == (nobody.pw_uid, group.gr_gid)
        daemon.fence()
        assert daemon.cgroup.pids() == [] and dead(pid)
    finally:
        daemon.stop()


def test_app_user_and_group_are_checked_with_the_service_file(tmp_path):
    for keys, words in [
            ('user = nosuchuser', 'user \'nosuchuser\' does not exist on'
             ' this host'),
            ('user = 4000000', "user '4000000' does not exist on this host"),
            ('user = nobody\ngroup = nosuchgroup', "group 'nosuchgroup' does"
             ' not exist on this host'),
            ('group = nogroup', 'group needs user')]:
        with pytest.raises(ConfigError) as info:
            load(tmp_path, '[app#a]\ncommand = sleep 1\n%s\n' % keys)
        assert str(info.value).endswith('[app#a]: ' + words), info.value
    # Checked again at start: a user removed since is one line.
    app = section_driver(tmp_path, Cgroup(str(tmp_path)), 'app#a',
                         command='sleep 1', user='nobody')
    app.conf.user = 'nosuchuser'
    with pytest.raises(ResourceError) as info:
        app.start()
    assert str(info.value) == "app#a: user 'nosuchuser' does not exist on" \
        ' this host'


# -- validation --------------------------------------------------------------

def test_validation_names_the_bad_value(tmp_path):
    """A bad value is a configuration error of the service file, one line
    naming the section and the value."""
    for text, section, words in [
            ('[ip#a]\naddress = 10.213.0.100/32 10.0.0.300/32\ndev = lab0\n',
             '[ip#a]', '10.0.0.300/32'),
            ('[ip#b]\naddress = 10.213.0.100\ndev = lab0\n'
             'routes = 10.9.0.0/16 by 10.213.0.254\n',
             '[ip#b]', '10.9.0.0/16 by 10.213.0.254'),
            ('[fs#c]\ndevice = srv/src\nmount_point = /srv/x\ntype = bind\n',
             '[fs#c]', 'srv/src'),
            ('[ip#a]\naddress = fd42::1::2\ndev = lab0\n', '[ip#a]',
             'fd42::1::2')]:
        with pytest.raises(ConfigError) as info:
            load(tmp_path, text)
        message = str(info.value)
        assert section in message and words in message, message
        assert '\n' not in message
    # A good section passes, and its address is the one fence_targets gives.
    good = load(tmp_path, '[ip#a]\naddress = 10.213.0.100\ndev = lab0\n'
                ).resources[0]
    assert driver('ip').validate(good) is None
    assert driver('ip')(good, None).fence_targets() == (
        [], [('10.213.0.100/32', 'lab0')])
