"""``fs``: a file system mounted where the service expects it.

A block device (a DRBD device, a disk that moves with the service), a
folder bind-mounted elsewhere (``type = bind``), or a virtual file system
(``device = tmpfs``, ``type = tmpfs``) mounted on ``mount_point``, e.g.
/srv/slapgrid, before the partitions start::

    [fs#slapgrid]
    device = /dev/drbd0
    mount_point = /srv/slapgrid
    options = noatime

The agent runs in the host's mount namespace, so the mount is made there.

Whether it is mounted is read from /proc/self/mountinfo, not remembered:
after an agent restart, ``start`` finds the mount in place and does nothing,
and ``status`` says the truth. A mount point where something else is
mounted is never mounted over nor unmounted: start fails naming what is
there, status is ``warn`` (a folder bind-mounted there is taken as the
folder itself, see :meth:`Fs._top`).

``stop`` unmounts, and fails as *busy* (naming the processes it can find)
rather than detaching lazily: a process still using the file system is a
bug of the resources stopped before this one, and it would go on writing to
data that may be handed to another host. ``fence`` detaches lazily
(``umount --lazy``): the lease is gone, the service's processes were killed
just before, and nothing may wait.
"""

import os
import subprocess

from slaposha.schema import REQUIRED, Key
from slaposha.inputs import one_line
from slaposha.proc import mounts_at
from slaposha.resources import (
    DOWN, UP, WARN, Resource, ResourceError, Status, register)

__all__ = ['Fs', 'mounts_at']


def _loop_backing_file(device):
    name = os.path.basename(device)
    try:
        with open('/sys/block/%s/loop/backing_file' % name) as f:
            return f.read().strip()
    except OSError:
        return None



def _users(path, limit=5):
    """Processes of our mount namespace whose working folder, root or an
    open file is in ``path``, as "PID (command)"."""
    try:
        ours = os.stat('/proc/self/ns/mnt').st_ino
    except OSError:
        return []
    users = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or len(users) >= limit:
            continue
        base = '/proc/' + pid
        try:
            if os.stat(base + '/ns/mnt').st_ino != ours:
                continue
            links = [base + '/cwd', base + '/root'] + [
                base + '/fd/' + fd for fd in os.listdir(base + '/fd')]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == path or target.startswith(path.rstrip('/') + '/'):
                try:
                    with open(base + '/comm') as f:
                        name = f.read().strip()
                except OSError:
                    name = '?'
                users.append('%s (%s)' % (pid, name))
                break
    return users


@register
class Fs(Resource):
    """a file system mounted on a folder (device, bind mount or tmpfs)"""

    kind = 'fs'
    keys = (
        Key('device', 'string', REQUIRED, 'what to mount: a block device, the'
            ' folder to bind-mount (type = bind), or e.g. tmpfs'),
        Key('mount_point', 'path', REQUIRED, 'where to mount it'),
        Key('type', 'string', None, 'file system type given to mount -t'
            ' (default: mount finds it); bind: a bind mount of the folder'
            ' device'),
        Key('options', 'string', None, 'mount options (mount -o)'),
        Key('mkdir', 'boolean', True, 'create the mount point when missing'),
    )

    @classmethod
    def validate(cls, section):
        if not section.device:
            return 'device: must not be empty'
        if section.type == 'bind' and not os.path.isabs(section.device):
            return 'device: a bind mount needs an absolute folder (got %r)' \
                % section.device
        if section.type and len(section.type.split()) != 1:
            return 'type: one file system type expected (got %r)' \
                % section.type
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.device = section.device
        self.mount_point = section.mount_point
        self.type = section.type or ''
        self.options = section.options or ''

    # -- what is mounted -----------------------------------------------------

    def _where(self):
        # mount resolves symbolic links; mountinfo shows the result.
        return os.path.realpath(self.mount_point)

    def _ours(self, mount):
        """Whether ``mount`` (the top mount on the mount point) is the
        configured one."""
        if self.type == 'bind':
            # A bind mount shows the source's file system and its root
            # folder in mountinfo, not the source path: compare the folder
            # seen at the mount point with the source folder itself.
            try:
                a = os.stat(self._where())
                b = os.stat(self.device)
            except OSError:
                return False
            return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        if self.type and mount.fstype != self.type:
            return False
        if not self.device.startswith('/'):
            return mount.source == self.device  # tmpfs, host:/export, ...
        device = os.path.realpath(self.device)
        if os.path.realpath(mount.source) == device:
            return True
        # An image file is mounted through a loop device.
        return mount.source.startswith('/dev/loop') and \
            _loop_backing_file(mount.source) == device

    def _top(self):
        """What is seen on the mount point, as a Mount; None when nothing
        is mounted there. A bind mount of a folder (or a subvolume) alone
        at the bottom is taken as the folder itself, not as a mount of
        something else: it is how the lab gives each host its own
        /srv/slapgrid, and how an fstab bind places a folder of a data
        disk. Whatever is mounted over it is what counts."""
        try:
            mounts = mounts_at(self._where())
        except (OSError, ValueError, IndexError) as e:
            raise ResourceError('%s: cannot read /proc/self/mountinfo: %s'
                                % (self.rid, e))
        if not mounts:
            return None
        top = mounts[-1]
        if len(mounts) == 1 and top.root != '/' and not self._ours(top):
            return None
        return top

    # -- verbs ---------------------------------------------------------------

    def start(self):
        if self.conf.mkdir:
            try:
                os.makedirs(self.mount_point, exist_ok=True)
            except OSError as e:
                raise ResourceError('%s: cannot create %s: %s' % (
                    self.rid, self.mount_point, e.strerror or e))
        top = self._top()
        if top is not None:
            if self._ours(top):
                return
            raise ResourceError('%s: %s is already mounted on %s' % (
                self.rid, top, self.mount_point))
        if self.type == 'bind':
            args = ['mount', '--bind']
        else:
            args = ['mount'] + (['-t', self.type] if self.type else [])
        if self.options:
            args += ['-o', self.options]
        p = self._run(args + [self.device, self.mount_point], 'mount')
        if p.returncode:
            raise ResourceError('%s: cannot mount %s on %s: %s' % (
                self.rid, self.device, self.mount_point,
                one_line(p.stderr) or 'exit %d' % p.returncode))

    def stop(self):
        # A mount made twice is stacked: unmount until ours is gone.
        for _ in range(10):
            top = self._top()
            if top is None or not self._ours(top):
                return
            p = self._run(['umount', self.mount_point], 'unmount')
            if p.returncode:
                if 'busy' in p.stderr:
                    users = _users(self._where())
                    who = 'used by %s' % ', '.join(users) if users else \
                        'a process or a mount below it uses it'
                    raise ResourceError('%s: cannot unmount %s: busy (%s)' % (
                        self.rid, self.mount_point, who))
                raise ResourceError('%s: cannot unmount %s: %s' % (
                    self.rid, self.mount_point,
                    one_line(p.stderr) or 'exit %d' % p.returncode))
        raise ResourceError('%s: %s is still mounted on %s after 10 unmounts'
                            % (self.rid, self.device, self.mount_point))

    def fence(self):
        """Detach at once, even if busy: the service's processes are dead
        or dying, and the lease is gone."""
        for _ in range(10):
            top = self._top()
            if top is None or not self._ours(top):
                return
            p = self._run(['umount', '--lazy', self.mount_point],
                          'unmount (lazy)')
            if p.returncode:
                raise ResourceError('%s: cannot detach %s: %s' % (
                    self.rid, self.mount_point,
                    one_line(p.stderr) or 'exit %d' % p.returncode))

    def fence_targets(self):
        return [], []

    def status(self):
        top = self._top()
        if top is None:
            return Status(DOWN, 'not mounted on %s' % self.mount_point)
        if self._ours(top):
            return Status(UP, '%s on %s' % (top, self.mount_point))
        return Status(WARN, '%s is mounted on %s instead of %s' % (
            top, self.mount_point, self.device))

    def _run(self, args, what, timeout=60):
        try:
            return subprocess.run(args, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL,
                                  universal_newlines=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ResourceError('%s: cannot %s %s: no answer within %ds' % (
                self.rid, what, self.mount_point, timeout))
        except OSError as e:
            raise ResourceError('%s: cannot %s %s: %s' % (
                self.rid, what, self.mount_point, e.strerror or e))
