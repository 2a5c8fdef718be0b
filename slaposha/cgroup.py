"""Control groups (v2): every process of a service, found and killed at once.

A service's processes live in a cgroup of their own, below the agent's
(``<agent cgroup>/slaposha/<service>/<resource>``): daemons that fork away
from their parent stay in it, and the kernel's ``cgroup.kill`` stops them
all in one write. This is what self-fencing relies on: at the deadline the
agent, or its watchdog, kills the cgroup, whatever the processes did.
``cgroup.freeze`` suspends them all as one (a late lease renewal: DESIGN.md
2); a frozen process runs nothing, writes nothing, and ``cgroup.kill``
still kills it.

Only the unified (v2) hierarchy is used; on hybrid systems it is the one
mounted at /sys/fs/cgroup/unified. No controller is enabled: the groups are
for finding and killing processes, not for limiting them.
"""

import os
import signal
import time

from slaposha.proc import mounts

__all__ = ['Cgroup', 'CgroupError', 'cgroup2_mount', 'own_cgroup']


class CgroupError(Exception):
    """The cgroup v2 hierarchy is missing or cannot be used, as one line."""


def cgroup2_mount():
    """Where the unified hierarchy is mounted, or None."""
    try:
        found = [m.mount_point for m in mounts() if m.fstype == 'cgroup2']
    except (OSError, ValueError, IndexError):
        return None
    return found[0] if found else None


def own_cgroup(pid='self'):
    """The v2 cgroup of a process, as a path under the mount."""
    mount = cgroup2_mount()
    if mount is None:
        raise CgroupError('no cgroup v2 hierarchy is mounted (the agent needs'
                          ' it to find and kill the processes of a service)')
    with open('/proc/%s/cgroup' % pid) as f:
        for line in f:
            if line.startswith('0::'):
                return os.path.join(mount, line[3:].strip().lstrip('/'))
    raise CgroupError('process %s has no cgroup v2 entry in /proc/%s/cgroup'
                      % (pid, pid))


class Cgroup(object):
    """One cgroup directory: create it, put processes in it, list and kill
    them, remove it."""

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return '<Cgroup %s>' % self.path

    def child(self, name):
        return Cgroup(os.path.join(self.path, name.replace('/', '_')))

    def exists(self):
        return os.path.isdir(self.path)

    def create(self):
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise CgroupError('cannot create cgroup %s: %s'
                              % (self.path, e.strerror or e))
        return self

    def wrap(self, argv):
        """A command line that joins this cgroup, then execs ``argv``: the
        process is in the group before it runs anything of its own."""
        return ['sh', '-c', 'echo $$ > "$0" && exec "$@"',
                os.path.join(self.path, 'cgroup.procs')] + list(argv)

    def add(self, pid):
        with open(os.path.join(self.path, 'cgroup.procs'), 'w') as f:
            f.write(str(pid))

    def pids(self):
        """Every process in this cgroup and below it."""
        pids = []
        for root, dirs, files in os.walk(self.path):
            try:
                with open(os.path.join(root, 'cgroup.procs')) as f:
                    pids.extend(int(p) for p in f.read().split())
            except OSError:
                continue
        return pids

    def kill(self, timeout=5.0):
        """SIGKILL everything in the cgroup (and below); wait until empty.
        Returns how many processes were there."""
        if not self.exists():
            return 0
        count = len(self.pids())
        kill_file = os.path.join(self.path, 'cgroup.kill')
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                self._unfreeze()
                return count
            if os.path.exists(kill_file):
                with open(kill_file, 'w') as f:
                    f.write('1')
            else:  # kernels before 5.14
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if time.monotonic() > deadline:
                raise CgroupError('processes %s of %s survive SIGKILL' % (
                    ' '.join(map(str, pids)), self.path))
            time.sleep(0.01)

    def _unfreeze(self):
        """An empty group left frozen would freeze what joins it next (the
        service started again): its freeze is undone."""
        path = os.path.join(self.path, 'cgroup.freeze')
        try:
            with open(path) as f:
                if f.read().strip() != '1':
                    return
            with open(path, 'w') as f:
                f.write('0')
        except OSError:
            pass

    def _events(self):
        """{key: value} of cgroup.events ('populated', 'frozen')."""
        with open(os.path.join(self.path, 'cgroup.events')) as f:
            return dict(line.split(None, 1) for line in f if ' ' in line)

    def frozen(self):
        try:
            return self._events().get('frozen', '0').strip() == '1'
        except OSError:
            return False

    def freeze(self, timeout=0.5, frozen=True):
        """Freeze every process in the cgroup and below it (``frozen``
        False: thaw them) and wait, at most ``timeout`` seconds, until the
        kernel says it is done (cgroup.events frozen 1, or 0). Returns
        False when it is not done in time (a process in an uninterruptible
        wait freezes when it leaves it); CgroupError when the cgroup cannot
        be frozen at all."""
        if not self.exists():
            return True
        try:
            with open(os.path.join(self.path, 'cgroup.freeze'), 'w') as f:
                f.write('1' if frozen else '0')
        except OSError as e:
            raise CgroupError('cannot %s cgroup %s: %s' % (
                'freeze' if frozen else 'thaw', self.path,
                e.strerror or e))
        deadline = time.monotonic() + timeout
        while self.frozen() != frozen:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def thaw(self, timeout=0.5):
        return self.freeze(timeout, frozen=False)

    def signal(self, sig):
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove(self):
        """Remove the (empty) cgroup and the groups below it."""
        if not self.exists():
            return
        for root, dirs, files in os.walk(self.path, topdown=False):
            try:
                os.rmdir(root)
            except OSError:
                pass
