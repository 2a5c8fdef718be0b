"""The rsync tree: a folder that follows its service, and its store.

For hosts without btrfs: the owner pushes the tree with rsync
(:mod:`slaposha.replication.push`) to each standby's receiver
(:class:`slaposha.replication.receiver.TreeReceiver`), which keeps the
copies in the tree's store here.

Complete copies only. A standby keeps two copies of each tree, ``a`` and
``b``, in the tree's store (default ``<parent>/.slaposha-rsync/<name>``, on
the same file system as the tree). A transfer always lands in the copy that
is not the newest complete one (``--copy-dest`` of the complete one, so
that files it already has are copied locally, not sent), and that copy
becomes the complete one only when ``rsync --server`` exited 0, after a
syncfs, by one atomic write of the store's state file, which records the
token, the sender and when the data was taken (``created``). A cut or
killed transfer leaves the complete copy untouched: it never counts. The
cost: up to twice the tree's size on a standby.

Takeover (:meth:`Tree.activate`) renames the newest complete copy to the
tree's path (a rename, whatever the size). What the path held before is
kept aside (``diverged-<when>`` in the store, listed in the status) unless
it is known to be in the copies the peers have (a clean stop whose last
copy reached every standby): then it becomes this host's next staging copy.
"""

import ctypes
import logging
import os
import shutil
import subprocess
import threading
import time

from slaposha.replication import ReplicationError, StaleToken
from slaposha.proc import mount_holding
from slaposha.replication.store import Store, alive
from slaposha.units import human_seconds

__all__ = ['Tree', 'STORE_DIR', 'MODES', 'fstype', 'is_subvolume',
           'exchange', 'syncfs']

# The log names the engine (as before its modules were split).
logger = logging.getLogger('slaposha.replication.rsync')

STORE_DIR = '.slaposha-rsync'
# How the sender made the copy consistent (or not), recorded with it.
MODES = ('snapshot', 'live', 'stopped')


_libc = None


def _libc_call(name, *args):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def syncfs(path):
    """Commit the file system of ``path``: a copy is complete only once it
    would survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc_call('syncfs', fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a, b):
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE)."""
    _libc_call('renameat2', _AT_FDCWD, os.fsencode(a), _AT_FDCWD,
               os.fsencode(b), _RENAME_EXCHANGE)


def _remove_later(path):
    """Delete a tree in the background: a takeover waits for nothing."""
    threading.Thread(target=shutil.rmtree, args=(path, True),
                     name='rm %s' % path, daemon=True).start()


def _mount_of(path):
    mount = mount_holding(path)
    return mount.mount_point if mount else None


def fstype(path):
    """The type of the file system holding ``path`` (from mountinfo)."""
    mount = mount_holding(path)
    return mount.fstype if mount else None


def is_subvolume(path):
    """Whether ``path`` is a btrfs subvolume (a snapshot can be taken)."""
    try:
        return os.lstat(path).st_ino == 256 and os.path.isdir(path) and \
            fstype(path) == 'btrfs'
    except OSError:
        return False


def _make_folder(path, subvolume):
    if subvolume:
        p = subprocess.run(['btrfs', 'subvolume', 'create', path],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
        if p.returncode == 0:
            return
    os.makedirs(path, exist_ok=True)


# -- the tree and its store ----------------------------------------------------

class Tree(Store):
    """A folder that follows its service, and its store on this host (the
    copies received, their records, the newest token seen)."""

    MODE = 0o700

    def __init__(self, path, store=None):
        path = os.path.normpath(path)
        if not os.path.isabs(path) or path == '/':
            raise ReplicationError(path, 'a tree is an absolute path below /')
        self.path = path
        self.name = os.path.basename(path)
        self.store = os.path.normpath(store) if store else os.path.join(
            os.path.dirname(path), STORE_DIR, self.name)

    def __repr__(self):
        return '<Tree %s>' % self.path

    def home(self):
        return self.store

    def buffer(self, name):
        return os.path.join(self.store, name)

    def exists(self):
        return os.path.isdir(self.path)

    def sweep(self):
        """Delete again, in the background, what a crash left half-deleted
        in the store (its ``trash-*`` folders: a copy is renamed there, then
        removed by a thread that died with the process); returns how many."""
        try:
            found = [n for n in os.listdir(self.store)
                     if n.startswith('trash-')]
        except OSError:
            return 0
        for name in found:
            _remove_later(os.path.join(self.store, name))
        return len(found)

    def check_layout(self):
        """Why the store cannot hold this tree's copies, or None: takeover
        renames a copy to the path, so both must be on one file system, and
        the path cannot be a mount point."""
        # Not os.path.ismount: a btrfs subvolume has a device of its own
        # and is no mount point (renaming it is fine).
        if _mount_of(self.path) == os.path.realpath(self.path):
            return '%s is a mount point: replicate a folder below it' \
                % self.path
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(self.store, mode=0o700, exist_ok=True)
            if os.stat(self.store).st_dev != os.stat(parent).st_dev:
                return 'the store %s is not on the file system of %s' % (
                    self.store, parent)
        except OSError as e:
            return 'cannot use the store %s: %s' % (self.store,
                                                     e.strerror or e)
        return None

    # -- state ----------------------------------------------------------------

    @staticmethod
    def _defaults():
        return {
            'token': 0,
            'complete': None,   # the buffer of the newest copy
            'records': {},      # buffer: record of a copy
            'live': None,       # what the path holds
            'clean': False,     # the path is in the peers' copies
            'active': None,     # the service runs here
            'peers': {},        # owner: peer: last record acked
            'diverged': [],
        }

    def _newest(self, state):
        name = state['complete']
        record = state['records'].get(name) if name else None
        if record is None or not os.path.isdir(self.buffer(name)):
            return None, None
        return name, record

    def newest(self):
        """(buffer name, record) of the newest complete copy here, or
        (None, None). A record: token, host, created, received, bytes,
        files, mode."""
        return self._newest(self.state())

    def freshness(self):
        """(seconds since the data of the newest complete copy was taken,
        a label), (None, None) when there is none: on a standby, how old
        its copy is."""
        name, record = self.newest()
        if record is None:
            return None, None
        created = record.get('created')
        label = 'copy of %s (token %s)' % (record.get('host'),
                                           record.get('token'))
        return (max(0.0, time.time() - created) if created else None), label

    # -- receiving ------------------------------------------------------------

    def begin(self, token, sender):
        """Admit a transfer of epoch ``token``: StaleToken when a newer
        epoch was seen here, ReplicationError when the service runs here.
        Returns (staging folder, the complete copy's folder or None)."""
        with self._locked() as state:
            self._may_receive(state, token, sender)
            state['token'] = token
            complete, _ = self._newest(state)
            return self._staging(state, complete), (
                self.buffer(complete) if complete else None)

    def _staging(self, state, complete):
        """The copy that is not the complete one (``complete``, a buffer
        name or None), made ready for a transfer or an import to land in;
        its folder."""
        target = 'b' if complete == 'a' else 'a'
        # Before a byte lands: this copy is not complete any more.
        state['records'][target] = None
        if not os.path.isdir(self.buffer(target)):
            # On btrfs, a copy is a subvolume: promoted, the tree stays
            # one, and its new owner can send from snapshots.
            _make_folder(self.buffer(target), fstype(self.store) == 'btrfs')
        return self.buffer(target)

    def commit(self, staging, record):
        """The transfer into ``staging`` finished: it becomes the newest
        complete copy, unless a newer owner was admitted meanwhile."""
        syncfs(staging)
        name = os.path.basename(staging)
        with self._locked() as state:
            if record['token'] < state['token']:
                raise StaleToken(self.path, 'dropped: a newer owner (token'
                                 ' %d) was admitted during the transfer'
                                 % state['token'], record.get('host'), True)
            if alive(state['active']):
                raise self.error('dropped: the service started here during'
                                 ' the transfer', record.get('host'), True)
            state['records'][name] = record
            state['complete'] = name

    # -- the service here -----------------------------------------------------

    def activate(self, token, host=None):
        """The service starts here as owner of epoch ``token``: StaleToken
        if a newer owner sent a copy here; else mark the tree in use and
        make sure the path holds the newest data. One line of what was
        done."""
        problem = self.check_layout()
        if problem:
            raise self.error(problem)
        with self._locked() as state:
            self._take_token(state, token)
            done = self._promote(state, token)
            # Whatever the path held, it is this epoch's data from now on.
            state['live'] = dict(state['live'] or {}, token=token)
            self._mark_active(state, token)
            state['clean'] = False
            return done

    def deactivate(self, clean=False):
        """The service stopped here; ``clean``: after a last copy that
        every standby acknowledged (nothing here is missing there)."""
        with self._locked() as state:
            state['active'] = None
            state['clean'] = bool(clean)

    def promote(self, token=None):
        """Make the newest complete copy the tree, by hand (no lease)."""
        with self._locked() as state:
            return self._promote(state, token)

    def _promote(self, state, token):
        name, record = self._newest(state)
        live = state['live']
        if os.path.lexists(self.path):
            if record is None:
                if live is None:
                    state['live'] = {'token': token, 'since': time.time()}
                return 'kept %s: no copy here is newer' % self.path
            if live is not None and live.get('token') is not None and \
                    live['token'] >= record['token']:
                return 'kept %s: it is newer than the copy of token %s' % (
                    self.path, record['token'])
            notes = [self._give_way(state, name)]
        elif record is None:
            os.makedirs(self.path)
            state['live'] = {'token': token, 'since': time.time()}
            return 'created an empty %s' % self.path
        else:
            notes = []
        started = time.monotonic()
        os.rename(self.buffer(name), self.path)
        state['records'][name] = None
        other = 'b' if name == 'a' else 'a'
        state['complete'] = other if state['records'].get(other) else None
        state['live'] = dict(record, token=record['token'],
                             since=time.time())
        return '; '.join(['promoted the copy of %s (token %s, %s old) to %s'
                          ' in %.3f s' % (record.get('host'), record['token'],
                                          human_seconds(max(0.0, time.time() - (
                                              record.get('created') or 0))),
                                          self.path,
                                          time.monotonic() - started)]
                         + notes)

    def _give_way(self, state, promoted):
        """The path holds older data than the copy about to replace it:
        reused as the next staging copy when the peers have all of it (a
        clean stop), deleted when empty, else kept aside."""
        other = 'b' if promoted == 'a' else 'a'
        if state['clean'] and state['live'] is not None:
            if os.path.lexists(self.buffer(other)):
                trash = os.path.join(self.store, 'trash-%d-%s' % (
                    time.time(), os.urandom(3).hex()))
                os.rename(self.buffer(other), trash)
                _remove_later(trash)
            os.rename(self.path, self.buffer(other))
            state['records'][other] = None
            return 'the former %s (stopped cleanly) is the next staging' \
                ' copy' % self.path
        if os.path.isdir(self.path) and not os.listdir(self.path):
            os.rmdir(self.path)
            return 'removed the empty %s' % self.path
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = os.path.join(self.store, 'diverged-%s' % stamp)
        n = 1
        while os.path.lexists(target):
            n += 1
            target = os.path.join(self.store, 'diverged-%s.%d' % (stamp, n))
        os.rename(self.path, target)
        reason = 'it may hold writes the copy of token %s does not have' % (
            state['records'][promoted]['token'])
        self._record_diverged(state, target, reason,
                              (state['live'] or {}).get('token'))
        logger.warning('%s: diverged: kept aside as %s (%s)', self.path,
                       target, reason)
        return 'kept the former %s aside as %s (%s)' % (self.path, target,
                                                        reason)

    def _remove_copy(self, path, wait=False):
        """Delete a diverged copy: renamed at once, removed in the
        background unless ``wait``."""
        trash = os.path.join(self.store, 'trash-%d-%s' % (
            time.time(), os.urandom(3).hex()))
        try:
            os.rename(path, trash)
        except OSError as e:
            raise self.error('cannot delete the diverged copy %s: %s' % (
                path, e.strerror or e))
        if wait:
            shutil.rmtree(trash, True)
        else:
            _remove_later(trash)

    def status(self):
        """What this host holds of the tree, as a dict (JSON-able)."""
        state = self.state()
        lag, label = self.freshness()
        name, record = self._newest(state)
        return {'tree': self.path, 'store': self.store,
                'exists': self.exists(), 'newest': record, 'lag': lag,
                'token': state['token'], 'live': state['live'],
                'active': self._active_token(state),
                'peers': state['peers'],
                'diverged': self._present_diverged(state)}
