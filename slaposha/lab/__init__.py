"""The multi-host lab: hosts as namespaces on one machine, with faults.

Used by the tests, the demo and the benchmarks. Each host is:

- a network namespace with one interface, ``lab0``, on a private bridge that
  has no address and no route out: traffic stays inside the lab;
- a mount namespace where /srv/slapgrid, /opt/slapgrid and /etc/opt/slapos
  (and the agent's /var/lib/slaposha and /run/slaposha) are that host's own
  folders at those same paths, as on real peers;
- a UTS namespace whose hostname is the host's name.

Faults: :meth:`Lab.crash` (link down, SIGKILL of every process of the host),
:meth:`Lab.partition` / :meth:`Lab.heal` (groups of hosts cut off from each
other), :meth:`Lab.pause` / :meth:`Lab.resume` (SIGSTOP / SIGCONT).

Everything the lab creates is written to a state file under /run before it
is created, so :meth:`Lab.teardown` removes it even after a failed test, and
a later lab removes what a killed run left (:func:`cleanup_stale`)::

    with Lab(['hA', 'hB', 'hW']) as lab:
        lab['hA'].run(['ping', '-c1', lab['hB'].address])
        lab.partition(['hA'])
"""

import atexit
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

from slaposha.cgroup import Cgroup, cgroup2_mount
from slaposha.proc import mounts, start_time

__all__ = ['Lab', 'Host', 'LabError', 'cleanup_stale', 'SLAPOS_PATHS',
           'HOST_PATHS', 'wait_for']

# Paths that are each host's own, as on separate machines: SlapOS's, and
# the agent's state and run folders.
SLAPOS_PATHS = ('/srv/slapgrid', '/opt/slapgrid', '/etc/opt/slapos')
HOST_PATHS = SLAPOS_PATHS + ('/var/lib/slaposha', '/run/slaposha')

RUN_ROOT = '/run/slaposha-lab'
WORK_ROOT = '/var/tmp/slaposha-lab'
SUBNET4 = '10.213.0.%d'
SUBNET6 = 'fd42:213::%x'
IFNAME = 'lab0'


class LabError(Exception):
    """A lab operation that could not be done, as one line."""


def _check_root():
    if os.geteuid() != 0:
        raise LabError('the slaposha lab needs root (it creates network and'
                       ' mount namespaces, bridges and loop devices): run it'
                       ' as root')


def _sh(args, check=True, timeout=30, input=None):
    """Run a command of the root namespace, returning its stdout."""
    try:
        p = subprocess.run(args, input=input, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabError('%s: no answer after %ss' % (' '.join(args), timeout))
    except FileNotFoundError:
        raise LabError('%s: command not found (install it)' % args[0])
    if check and p.returncode:
        raise LabError('%s: exit %d: %s' % (' '.join(args), p.returncode,
                                              p.stderr.strip()[-300:]))
    return p.stdout


def _alive(pid, started=None):
    st = start_time(pid)
    return st is not None and (started is None or st == started)


def _ns_inode(path):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in(net_path=None, mnt_path=None):
    """PIDs whose network or mount namespace is the given one."""
    targets = []
    for kind, path in (('net', net_path), ('mnt', mnt_path)):
        ino = _ns_inode(path) if path else None
        if ino is not None:
            targets.append((kind, ino))
    pids = []
    if not targets:
        return pids
    me = os.getpid()
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == me:
            continue
        for kind, ino in targets:
            try:
                if os.stat('/proc/%s/ns/%s' % (entry, kind)).st_ino == ino:
                    pids.append(int(entry))
                    break
            except OSError:
                break
    return pids


def _kill_all(find, sig=signal.SIGKILL, timeout=5.0):
    """Signal every PID ``find()`` returns until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = find()
        if not pids:
            return
        if time.monotonic() > deadline:
            raise LabError('processes %s survive SIGKILL'
                           % ' '.join(map(str, pids)))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


class Host(object):
    """One host of the lab: its namespaces, address and processes."""

    def __init__(self, lab, name, index):
        self.lab = lab
        self.name = name
        self.index = index
        self.address = SUBNET4 % (index + 1)
        self.address6 = SUBNET6 % (index + 1)
        self.netns = 'sha-%s-%s' % (lab.id, name)
        self.veth = 'sha%sh%d' % (lab.id, index)
        self.root = os.path.join(lab.workdir, name)
        # Every process started in the host goes into its cgroup: the agent
        # makes its services' groups below it, and a crash kills it whole.
        self.cgroup = lab.cgroup.child(name) if lab.cgroup else None
        self._procs = []
        self.disks = []  # (device, mount point, options), as in its fstab

    def __repr__(self):
        return '<Host %s %s>' % (self.name, self.address)

    # -- namespaces ---------------------------------------------------------

    @property
    def net_path(self):
        return '/run/netns/%s' % self.netns

    @property
    def mnt_path(self):
        return os.path.join(self.lab.rundir, '%s.mnt' % self.name)

    @property
    def uts_path(self):
        return os.path.join(self.lab.rundir, '%s.uts' % self.name)

    def path(self, inside):
        """Where a path of the host's own (/srv/slapgrid/...) lives in the
        root namespace, to read or prepare its files from outside."""
        for own in self.lab.paths:
            if inside == own:
                return os.path.join(self.root, own.strip('/'))
            if inside.startswith(own + '/'):
                return os.path.join(self.root, own.strip('/'),
                                    os.path.relpath(inside, own))
        raise LabError('%s is not one of the host paths (%s)'
                       % (inside, ', '.join(self.lab.paths)))

    def _enter(self, args):
        if isinstance(args, str):
            args = ['sh', '-c', args]
        enter = ['nsenter', '--net=%s' % self.net_path,
                 '--mount=%s' % self.mnt_path, '--uts=%s' % self.uts_path,
                 '--'] + list(args)
        return enter if self.cgroup is None else self.cgroup.wrap(enter)

    def _mount_namespace(self):
        """(Re)create the host's mount and UTS namespaces: its own folders at
        the SlapOS paths, as after a boot; mounts made before are gone."""
        for path in (self.mnt_path, self.uts_path):
            if os.path.exists(path):
                _sh(['umount', path], check=False)
            with open(path, 'w'):
                pass
        binds = []
        for layer in self.lab.layers:
            # The machine's folder seen through the host's own changes,
            # which survive its restarts (as a disk would keep them).
            top = os.path.join(self.root, 'layers', layer.strip('/'))
            for sub in ('upper', 'work'):
                os.makedirs(os.path.join(top, sub), exist_ok=True)
            binds.append('mount -t overlay overlay -o lowerdir=%s,upperdir='
                         '%s/upper,workdir=%s/work %s' % (layer, top, top,
                                                         layer))
        for own in self.lab.paths:
            src = os.path.join(self.root, own.strip('/'))
            if os.path.isfile(own):
                # A file of the host's own (/etc/passwd): a copy of the
                # machine's, which a test may then change for this host.
                if not os.path.exists(src):
                    os.makedirs(os.path.dirname(src), exist_ok=True)
                    shutil.copy2(own, src)
            else:
                os.makedirs(src, exist_ok=True)
            binds.append('mount --bind %s %s' % (src, own))
        for own, src in sorted(self.lab.shared.items()):
            binds.append('mount --bind %s %s' % (src, own))
        for device, target, options in self.disks:
            binds.append('mount -o %s %s %s' % (options, device, target))
        script = ' && '.join(binds + ['hostname %s' % self.name])
        _sh(['unshare', '--mount=%s' % self.mnt_path,
             '--uts=%s' % self.uts_path, '--propagation', 'private',
             'sh', '-c', script])

    # -- running things -----------------------------------------------------

    def run(self, args, check=True, timeout=60, input=None, env=None):
        """Run a command in the host and wait; returns CompletedProcess
        with text stdout and stderr. ``args`` is a list, or a string for sh.
        """
        cmd = self._enter(args)
        try:
            p = subprocess.run(cmd, input=input, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env,
                               universal_newlines=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabError('%s: %s: no answer after %ss'
                           % (self.name, _show(args), timeout))
        if check and p.returncode:
            raise LabError('%s: %s: exit %d: %s' % (
                self.name, _show(args), p.returncode,
                (p.stderr.strip() or p.stdout.strip())[-500:]))
        return p

    def spawn(self, args, name=None, env=None, cwd=None):
        """Start a long-lived process in the host; its output goes to
        <lab workdir>/<host>/log/<name>.log. Returns the Popen."""
        name = name or os.path.basename(
            args.split()[0] if isinstance(args, str) else args[0])
        logdir = os.path.join(self.root, 'log')
        os.makedirs(logdir, exist_ok=True)
        log = open(os.path.join(logdir, '%s.log' % name), 'ab')
        try:
            proc = subprocess.Popen(self._enter(args), stdout=log,
                                    stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    cwd=cwd, start_new_session=True)
        finally:
            log.close()
        proc.log_path = os.path.join(logdir, '%s.log' % name)
        # Those that ended are reaped (crashes kill them without a wait):
        # a long run must not pile up zombies.
        self._procs = [p for p in self._procs if p.poll() is None]
        self._procs.append(proc)
        self.lab._record_pid(proc.pid)
        return proc

    def pids(self):
        """Every process of the host (in its network or mount namespace,
        or in its cgroup)."""
        pids = set(_pids_in(self.net_path, self.mnt_path))
        if self.cgroup is not None:
            pids.update(self.cgroup.pids())
        return sorted(pids)

    def ping(self, other, timeout=1.5):
        """True when ``other`` (a Host or an address) answers a ping within
        ``timeout`` seconds (one every 0.2 s until the first answer)."""
        address = other.address if isinstance(other, Host) else other
        p = self.run(['ping', '-n', '-q', '-c', '1', '-i', '0.2', '-w',
                      str(max(1, int(round(timeout)))), address],
                     check=False, timeout=timeout + 5)
        return p.returncode == 0

    # -- faults ---------------------------------------------------------------

    def link(self, up):
        _sh(['ip', 'link', 'set', self.veth, 'up' if up else 'down'])

    def signal_all(self, sig):
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _show(args):
    return args if isinstance(args, str) else ' '.join(args)


class Lab(object):
    """N hosts on a private bridge. Use as a context manager, or call
    :meth:`start` and :meth:`teardown` (also on failure)."""

    def __init__(self, hosts=('hA', 'hB'), paths=HOST_PATHS,
                 run_root=RUN_ROOT, work_root=WORK_ROOT, shared=None,
                 layers=()):
        if len(set(hosts)) != len(hosts) or not hosts:
            raise LabError('host names must be given and distinct: %r'
                           % (hosts,))
        if len(hosts) > 200:
            raise LabError('at most 200 hosts in a lab')
        self.paths = tuple(paths)
        # {path in every host: folder of the machine}: the same software at
        # the same path on every host, as identical installs of the peers
        # (the SlapOS node's /opt/slapos), without its real parents.
        self.shared = dict(shared or {})
        # Folders each host sees as the machine's with its own changes on
        # top (an overlay): /etc, for users that a host creates, its cron.
        self.layers = tuple(layers)
        self.run_root = run_root
        self.work_root = work_root
        self.id = None
        self.cgroup = None
        self.hosts = {}
        self._names = list(hosts)
        self._state = None
        self._lock = threading.Lock()
        self._old_sigterm = None

    def __getitem__(self, name):
        return self.hosts[name]

    def __iter__(self):
        return iter(self.hosts[n] for n in self._names)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.teardown()

    # -- state ------------------------------------------------------------------

    @property
    def rundir(self):
        return os.path.join(self.run_root, self.id)

    @property
    def bridge(self):
        return 'shab%s' % self.id

    def _save(self):
        tmp = os.path.join(self.rundir, 'state.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(self._state, f)
        os.rename(tmp, os.path.join(self.rundir, 'state.json'))

    def _record(self, kind, value):
        with self._lock:
            if value not in self._state[kind]:
                self._state[kind].append(value)
                self._save()

    def _record_pid(self, pid):
        self._record('pids', [pid, start_time(pid)])

    # -- life cycle -------------------------------------------------------------

    def start(self):
        _check_root()
        for tool in ('ip', 'nsenter', 'unshare', 'losetup', 'ping'):
            if shutil.which(tool) is None:
                raise LabError('%s is missing: install iproute2, util-linux'
                               ' and iputils-ping' % tool)
        os.makedirs(self.run_root, exist_ok=True)
        cleanup_stale(self.run_root)
        while True:
            self.id = '%04x' % random.randrange(0x10000)
            try:
                os.mkdir(self.rundir)
                break
            except FileExistsError:
                continue
        self.workdir = os.path.join(self.work_root, self.id)
        self._state = {
            'id': self.id, 'owner': [os.getpid(), start_time(os.getpid())],
            'workdir': self.workdir, 'rundir': self.rundir,
            'bridges': [], 'netns': [], 'ns_files': [], 'loops': [],
            'pids': [], 'mountpoints': [], 'rundir_mounted': False,
            'cgroup': None, 'veths': [],
        }
        self._save()
        self._install_sigterm()
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _install_sigterm(self):
        # A test run stopped with SIGTERM still tears its lab down.
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise SystemExit(128 + signum)
        self._old_sigterm = signal.signal(signal.SIGTERM, handler)

    def _build(self):
        # A private mount of the run folder, so the namespace files can be
        # bind-mounted in it (the kernel refuses that under a shared mount).
        self._state['rundir_mounted'] = True
        self._save()
        _sh(['mount', '--bind', self.rundir, self.rundir])
        _sh(['mount', '--make-private', self.rundir])
        for own in self.paths + tuple(self.shared):
            if not os.path.exists(own):
                self._record('mountpoints', own)
                os.makedirs(own)
        mount = cgroup2_mount()
        if mount is not None:
            self.cgroup = Cgroup(os.path.join(mount, 'slaposha-lab', self.id))
            self._state['cgroup'] = self.cgroup.path
            self._save()
            self.cgroup.create()
        self._record('bridges', self.bridge)
        _sh(['ip', 'link', 'add', self.bridge, 'type', 'bridge'])
        _quiet_ipv6(self.bridge)
        _sh(['ip', 'link', 'set', self.bridge, 'up'])
        for index, name in enumerate(self._names):
            host = Host(self, name, index)
            self.hosts[name] = host
            os.makedirs(host.root, exist_ok=True)
            if host.cgroup is not None:
                host.cgroup.create()
            self._record('netns', host.netns)
            self._record('ns_files', host.mnt_path)
            self._record('ns_files', host.uts_path)
            _sh(['ip', 'netns', 'add', host.netns])
            peer = 'sha%sn%d' % (self.id, index)
            self._record('veths', host.veth)
            _sh(['ip', 'link', 'add', host.veth, 'type', 'veth', 'peer',
                 'name', peer])
            _sh(['ip', 'link', 'set', peer, 'netns', host.netns])
            _quiet_ipv6(host.veth)
            _sh(['ip', 'link', 'set', host.veth, 'master', self.bridge, 'up'])
            # Announce the address when the link comes back, as a booting
            # host does, so that peers forget a failed neighbour entry.
            _sh(['ip', 'netns', 'exec', host.netns, 'sh', '-c',
                 'echo 1 > /proc/sys/net/ipv4/conf/all/arp_notify'])
            batch = '\n'.join([
                'link set lo up',
                'link set %s name %s' % (peer, IFNAME),
                'addr add %s/24 dev %s' % (host.address, IFNAME),
                'addr add %s/64 dev %s nodad' % (host.address6, IFNAME),
                'link set %s up' % IFNAME,
            ]) + '\n'
            _sh(['ip', '-n', host.netns, '-batch', '-'], input=batch)
            host._mount_namespace()

    def teardown(self):
        """Remove everything of the lab; safe to call twice."""
        if self._state is None:
            return
        state, self._state = self._state, None
        if self._old_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            except ValueError:
                pass
            self._old_sigterm = None
        for host in self.hosts.values():
            for proc in host._procs:
                try:
                    proc.wait(0)
                except Exception:
                    pass
        _teardown(state)

    # -- faults -------------------------------------------------------------------

    def crash(self, name):
        """As if the host lost power: link down first (no goodbye packets),
        then SIGKILL of every process of the host."""
        host = self.hosts[name]
        host.link(False)
        if host.cgroup is not None:
            host.cgroup.kill()
        _kill_all(host.pids)

    def restart(self, name):
        """Bring a crashed host back as after a boot: fresh mount namespace
        (runtime mounts are gone), only its base addresses, link up."""
        host = self.hosts[name]
        _kill_all(host.pids)
        # /run is a tmpfs on a real host: a boot starts it empty (stale
        # sockets and pid files of the dead agent go).
        for own in self.paths:
            if own == '/run' or own.startswith('/run/'):
                folder = host.path(own)
                if os.path.isdir(folder):
                    for entry in os.listdir(folder):
                        path = os.path.join(folder, entry)
                        if os.path.isdir(path) and not os.path.islink(path):
                            shutil.rmtree(path, True)
                        else:
                            os.unlink(path)
        host._mount_namespace()
        batch = '\n'.join([
            'addr flush dev %s' % IFNAME,
            'addr add %s/24 dev %s' % (host.address, IFNAME),
            'addr add %s/64 dev %s nodad' % (host.address6, IFNAME),
        ]) + '\n'
        _sh(['ip', '-n', host.netns, '-batch', '-'], input=batch)
        # Peers forget the failed neighbour entries of the dead host, as
        # they would have after a real reboot's minutes: the next packet
        # resolves its address afresh.
        for peer in self.hosts.values():
            if peer is not host:
                _sh(['ip', '-n', peer.netns, 'neigh', 'flush', 'to',
                     host.address], check=False)
                _sh(['ip', '-n', peer.netns, '-6', 'neigh', 'flush', 'to',
                     host.address6], check=False)
        self.heal(name)
        host.link(True)

    def partition(self, *groups):
        """Cut each group of hosts off from the rest and from each other;
        hosts in no group stay together. ``partition(['hA'])`` isolates hA.
        Each group gets a bridge of its own, so the cut is at layer 2."""
        listed = [h for g in groups for h in g]
        if len(set(listed)) != len(listed):
            raise LabError('a host appears in two partition groups')
        for name in listed:
            if name not in self.hosts:
                raise LabError('no host %r in the lab' % name)
        for k, group in enumerate(groups):
            bridge = '%sp%d' % (self.bridge, k)
            if bridge not in self._state['bridges']:
                self._record('bridges', bridge)
                _sh(['ip', 'link', 'add', bridge, 'type', 'bridge'])
                _quiet_ipv6(bridge)
                _sh(['ip', 'link', 'set', bridge, 'up'])
            for name in group:
                _sh(['ip', 'link', 'set', self.hosts[name].veth, 'master',
                     bridge])

    def heal(self, *names):
        """Put hosts (default: all) back on the main bridge."""
        for name in names or self._names:
            _sh(['ip', 'link', 'set', self.hosts[name].veth, 'master',
                 self.bridge])

    def pause(self, name, pids=None):
        """SIGSTOP the given PIDs of the host, or all of them."""
        self._signal(name, signal.SIGSTOP, pids)

    def resume(self, name, pids=None):
        self._signal(name, signal.SIGCONT, pids)

    def _signal(self, name, sig, pids):
        if pids is None:
            self.hosts[name].signal_all(sig)
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- disks --------------------------------------------------------------------

    def mount_disk(self, name, device, target, options='noatime'):
        """Mount ``device`` at ``target`` in host ``name``, now and after
        every restart (its fstab). Only in the host's mount namespace: a
        mount in the root one would be copied into the namespaces that
        other labs create meanwhile and keep the loop device busy."""
        host = self.hosts[name]
        host.run(['mount', '-o', options, device, target])
        host.disks.append((device, target, options))

    def add_disk(self, name, size='256M', label='disk'):
        """A loop device backed by a sparse file of the host's: its disk,
        which survives crashes. Returns the device path."""
        host = self.hosts[name]
        image = os.path.join(host.root, '%s.img' % label)
        with open(image, 'wb') as f:
            f.truncate(_parse_size(size))
        device = _sh(['losetup', '--find', '--show', image]).strip()
        self._record('loops', [device, image])
        return device


def _parse_size(size):
    if isinstance(size, int):
        return size
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    return int(size[:-1]) * units[size[-1].upper()] \
        if size[-1].upper() in units else int(size)


def _quiet_ipv6(ifname):
    """No IPv6 on the root-namespace side: the root host must neither talk
    on the lab's segment nor answer for it."""
    path = '/proc/sys/net/ipv6/conf/%s/disable_ipv6' % ifname
    try:
        with open(path, 'w') as f:
            f.write('1')
    except OSError:
        pass


def _teardown(state):
    """Remove what a state file lists, in dependency order. Every step goes
    on when an earlier one failed: a half-built lab is torn down too."""
    errors = []

    def step(func, *args):
        try:
            func(*args)
        except Exception as e:  # keep going; report at the end
            errors.append(str(e))

    # Processes by PID: the ones the lab started, then any left in a host.
    for pid, start in state.get('pids', []):
        if _alive(pid, start):
            step(os.kill, pid, signal.SIGKILL)
    if state.get('cgroup'):
        step(Cgroup(state['cgroup']).kill)
    for netns, mnt in _host_ns(state):
        step(_kill_all, lambda n=netns, m=mnt: _pids_in(n, m))
    # Mounts made in the root namespace on a lab disk (a test's own).
    loops = [d for d, _ in state.get('loops', [])]
    for device in loops:
        step(_umount_device, device)
    for path in state.get('ns_files', []):
        if os.path.exists(path):
            step(_sh, ['umount', '--lazy', path], False)
    # Deleting one end of a veth pair removes both at once; a deleted
    # namespace would only take its end away later, asynchronously.
    for veth in state.get('veths', []):
        if os.path.exists('/sys/class/net/%s' % veth):
            step(_sh, ['ip', 'link', 'del', veth], False)
    for netns in state.get('netns', []):
        if os.path.exists('/run/netns/%s' % netns):
            step(_sh, ['ip', 'netns', 'del', netns])
    for bridge in state.get('bridges', []):
        if os.path.exists('/sys/class/net/%s' % bridge):
            step(_sh, ['ip', 'link', 'del', bridge])
    for device, image in state.get('loops', []):
        step(_detach_loop, device, image)
    if state.get('rundir_mounted'):
        step(_sh, ['umount', '--lazy', state['rundir']], False)
    if state.get('cgroup'):
        step(Cgroup(state['cgroup']).remove)
    step(shutil.rmtree, state['workdir'], True)
    step(shutil.rmtree, state['rundir'], True)
    others = [d for d in _list_dir(os.path.dirname(state['rundir']))
              if d != state['id']]
    if not others:
        for path in state.get('mountpoints', []):
            try:
                os.rmdir(path)
            except OSError:
                pass
    if errors:
        raise LabError('lab %s teardown: %s' % (state['id'],
                                                '; '.join(errors)))


def _host_ns(state):
    for netns in state.get('netns', []):
        yield '/run/netns/%s' % netns, None
    for path in state.get('ns_files', []):
        if path.endswith('.mnt'):
            yield None, path


def _umount_device(device):
    targets = [m.mount_point for m in mounts() if m.source == device]
    for target in reversed(targets):
        _sh(['umount', '--lazy', target], False)


def _detach_loop(device, image):
    # The kernel frees a loop device only when nothing holds it; a mount
    # namespace that was just released may still, for a moment.
    for _ in range(50):
        out = _sh(['losetup', '--noheadings', '--output', 'BACK-FILE',
                   device], False)
        if image not in out:
            break
        _sh(['losetup', '--detach', device], False)
        time.sleep(0.05)
    else:
        raise LabError('loop device %s (%s) stays busy' % (device, image))


def _list_dir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _owner_alive(state):
    pid, start = state.get('owner', [None, None])
    return pid is not None and _alive(pid, start)


def cleanup_stale(run_root=RUN_ROOT, everything=False):
    """Tear down labs whose owning process is gone (a killed test run), or
    every lab with ``everything``. Returns the ids removed."""
    removed = []
    for lab_id in _list_dir(run_root):
        path = os.path.join(run_root, lab_id, 'state.json')
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            # A lab killed before it wrote its state owns nothing yet,
            # unless its owner is still creating it: keep young folders.
            folder = os.path.join(run_root, lab_id)
            try:
                if time.time() - os.stat(folder).st_mtime > 60:
                    _sh(['umount', '--lazy', folder], False)
                    shutil.rmtree(folder, True)
            except OSError:
                pass
            continue
        if everything or not _owner_alive(state):
            try:
                _teardown(state)
            except LabError:
                pass
            removed.append(lab_id)
    return removed


def wait_for(predicate, timeout, interval=0.05, what='condition'):
    """Poll ``predicate`` until it is true; LabError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError('%s not reached within %ss' % (what, timeout))
        time.sleep(interval)

