"""The btrfs volume: the protected subvolume, its snapshots and its state.

Why snapshots (reference/replication.md, section 2): a read-only btrfs
snapshot is atomic, so every copy a standby holds is what a power cut at that
instant would have left, which is what databases recover from (rsync of a
live folder mixes transactions); and btrfs knows what changed between two
snapshots without scanning, so a cycle after a small change costs a fraction
of a second whatever the number of files.

:class:`Volume` is the protected btrfs subvolume (e.g. /srv/slapgrid) and,
on the same file system, its snapshots and state: ``snapshot(token)``,
``prune(keep)``, ``promote()``, ``freshness()``, ``status()``. The owner
sends its snapshots with :class:`slaposha.replication.sender.Sender`; every
host receives them with :class:`slaposha.replication.receiver.Receiver`.
This module also reads ``btrfs send`` streams for both (:class:`Changes`).

Names and order: a snapshot is ``<seq>-<token>``, the owner's sequence
number and its fencing token (epoch). Snapshots are ordered by token first,
then seq: whatever an owner of a newer epoch took is newer than anything of
an older epoch, whatever the numbers.

Layout, at the root of the file system that holds the volume::

    <mount>/.slaposha/snapshots/<volume name>/<seq>-<token>   read-only
    <mount>/.slaposha/snapshots/<volume name>/.meta/          when, by whom
    <mount>/.slaposha/snapshots/<volume name>/.state.json     see below
    <mount>/.slaposha/snapshots/<volume name>/diverged-*      kept aside
    <mount>/.slaposha/diverged/<volume name>/                 kept aside

Streams are received straight into the snapshots folder: btrfs refuses to
move a read-only subvolume to another folder, so a staging folder could not
hand its snapshot over. Hence "complete" means read-only there: a
half-received snapshot is writable, never listed, and deleted before the
next stream. For the same reason snapshots set aside stay in that folder,
renamed ``diverged-<when>-<name>``.

The state file holds the newest token seen (a receiver refuses any stream
of an older epoch, so a deposed owner never overwrites the new owner's
data), the snapshot the live volume descends from, the newest snapshot known
to be on each peer (never pruned: the next send to that peer stays
incremental, even after a long absence), whether the service runs here (a
receiver never writes into a volume in use), and what was set aside.

A standby holds no live volume: its copies are the snapshots, and
``promote`` makes the newest one the writable volume at takeover (a
writable snapshot: tens of milliseconds). When a stream of a new owner
arrives at a host whose own volume or snapshots hold writes the new owner
does not have (both wrote: the old owner crashed after its last copy was
sent), they are set aside (renamed as above), never deleted, and
``status()`` says so.
"""

import ctypes
import fcntl
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections import namedtuple

from slaposha.replication import ReplicationError, trim
from slaposha.proc import mount_holding
from slaposha.replication.store import Store, alive

__all__ = ['Volume', 'Snapshot', 'NAME_RE', 'snapshot_name', 'Changes']

# The log names the engine (as before its modules were split).
logger = logging.getLogger('slaposha.replication.btrfs')

CHUNK = 1 << 20
NAME_RE = re.compile(r'^([0-9]{6,})-([0-9]+)$')

# BTRFS_IOC_SUBVOL_GETFLAGS and its read-only flag: how a received
# subvolume says btrfs receive finished it (it sets the flag last).
_IOC_SUBVOL_GETFLAGS = 0x80089419
_SUBVOL_RDONLY = 1 << 1
# Every btrfs subvolume's root folder has this inode number.
_SUBVOL_INODE = 256

Snapshot = namedtuple('Snapshot', 'name seq token path')
Snapshot.key = property(lambda s: (s.token, s.seq))


def snapshot_name(seq, token):
    return '%06d-%d' % (seq, token)


# fcntl.F_SETPIPE_SZ (Python 3.10+).
_SETPIPE_SZ = getattr(fcntl, 'F_SETPIPE_SZ', 1031)


def widen(pipe):
    """A pipe of 1 MiB instead of 64 KiB: fewer wake-ups and frames per
    stream, which counts on a host with few cores."""
    try:
        fcntl.fcntl(pipe.fileno(), _SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default works too


def read_only(path):
    """Whether subvolume ``path`` is read-only; None when it is gone (being
    deleted by another thread) or not a subvolume."""
    buf = bytearray(8)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, _IOC_SUBVOL_GETFLAGS, buf)
        finally:
            os.close(fd)
    except OSError:
        return None
    return bool(int.from_bytes(buf, 'little') & _SUBVOL_RDONLY)


def is_subvolume(path):
    try:
        return os.lstat(path).st_ino == _SUBVOL_INODE and os.path.isdir(path)
    except OSError:
        return False


_libc = None


def syncfs(path):
    """Commit the file system of ``path``: what was received survives a
    power cut before the sender is told it is there."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), 'syncfs failed')
    finally:
        os.close(fd)


def stderr_text(f):
    f.seek(0)
    return trim(f.read().decode(errors='replace'))


# -- the volume ---------------------------------------------------------------

class Volume(Store):
    """A btrfs subvolume that slaposha protects, and its snapshots on the
    same file system. Every step runs in the caller's mount namespace (the
    host's)."""

    STATE_FILE = '.state.json'

    def __init__(self, path):
        path = os.path.normpath(path)
        if not os.path.isabs(path) or path == '/':
            raise ReplicationError(path, 'a volume is an absolute path below'
                                   ' the root of a btrfs file system')
        self.path = path
        self.name = os.path.basename(path)
        self._root = None
        # Snapshots kept as backups (a Retention; None: only what
        # replication needs), and the clock snapshots are dated by (a test
        # moves its own).
        self.retention = None
        self.clock = time.time

    def __repr__(self):
        return '<Volume %s>' % self.path

    # -- where things are -----------------------------------------------------

    @property
    def root(self):
        """The mount point of the btrfs file system holding the volume."""
        if self._root is None:
            where = os.path.join(os.path.realpath(os.path.dirname(self.path)),
                                 self.name)
            best = mount_holding(where)
            if best is None or best.fstype != 'btrfs':
                raise self.error('not on a btrfs file system (%s is %s)' % (
                    best.mount_point if best else '/',
                    best.fstype if best else 'unknown'))
            if best.mount_point == where:
                raise self.error('is the mount point of its file system: the'
                                 ' volume must be a subvolume below it')
            self._root = best.mount_point
        return self._root

    @property
    def snapdir(self):
        return os.path.join(self.root, '.slaposha', 'snapshots', self.name)

    def home(self):
        return self.snapdir

    @property
    def diverged_dir(self):
        return os.path.join(self.root, '.slaposha', 'diverged', self.name)

    def _folder(self, name):
        path = os.path.join(self.snapdir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def exists(self):
        """Whether the live (writable) volume is there."""
        return os.path.isdir(self.path)

    # -- running btrfs --------------------------------------------------------

    def _run(self, args, what, timeout=120, peer=None):
        try:
            p = subprocess.run(['btrfs'] + args, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL,
                               universal_newlines=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.error('%s: no answer from btrfs within %ds'
                             % (what, timeout), peer)
        except OSError as e:
            raise self.error('%s: cannot run btrfs: %s'
                             % (what, e.strerror or e), peer)
        if p.returncode:
            raise self.error('%s: %s' % (what, trim(p.stderr) or 'btrfs exit'
                                         ' %d' % p.returncode), peer)
        return p

    def _delete_subvolume(self, path, what):
        self._run(['subvolume', 'delete', path], what)

    # -- state ----------------------------------------------------------------

    @staticmethod
    def _defaults():
        return {'token': 0, 'seq': 0, 'live': None, 'peers': {},
                'diverged': [], 'active': None}

    # -- snapshots ------------------------------------------------------------

    def snapshots(self):
        """The complete snapshots, oldest first."""
        try:
            names = os.listdir(self.snapdir)
        except FileNotFoundError:
            return []
        found = [self.get(name) for name in names if NAME_RE.match(name)]
        return sorted((s for s in found if s), key=lambda s: s.key)

    def get(self, name):
        """The complete snapshot ``name``, or None."""
        if not name or not NAME_RE.match(name):
            return None
        path = os.path.join(self.snapdir, name)
        if not is_subvolume(path) or read_only(path) is not True:
            return None
        seq, token = name.split('-')
        return Snapshot(name, int(seq), int(token), path)

    def _partial(self):
        """Snapshots a cut or killed receive left (writable)."""
        try:
            names = os.listdir(self.snapdir)
        except FileNotFoundError:
            return []
        paths = [os.path.join(self.snapdir, n) for n in names
                 if NAME_RE.match(n)]
        return [p for p in paths if is_subvolume(p) and
                read_only(p) is False]

    def _drop_partial(self, path):
        self._delete_subvolume(path, 'cannot delete the partial snapshot'
                               ' %s' % os.path.basename(path))
        self._drop_meta(os.path.basename(path))

    def newest(self):
        snapshots = self.snapshots()
        return snapshots[-1] if snapshots else None

    def meta(self, name):
        """What the owner said of a snapshot: ``created`` (wall clock, when
        it was taken), ``host``, ``token``; {} when unknown."""
        try:
            with open(os.path.join(self.snapdir, '.meta', name + '.json')) \
                    as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write_meta(self, name, meta):
        path = os.path.join(self._folder('.meta'), name + '.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(meta, f)
        os.rename(path + '.tmp', path)

    def _drop_meta(self, name):
        try:
            os.unlink(os.path.join(self.snapdir, '.meta', name + '.json'))
        except FileNotFoundError:
            pass

    def snapshot(self, token, host=None):
        """Take a read-only snapshot of the live volume, named with the next
        sequence number and ``token``. Returns the Snapshot."""
        with self._locked() as state:
            if not self.exists():
                raise self.error('cannot take a snapshot: the volume is'
                                 ' missing')
            seq = max([state['seq']] + [s.seq for s in self.snapshots()]) + 1
            name = snapshot_name(seq, token)
            path = os.path.join(self.snapdir, name)
            # The time before the snapshot: whatever was written before it
            # is in the copy, which is what freshness and RPO count from.
            created = self.clock()
            self._write_meta(name, {'created': created, 'token': token,
                                    'host': host or socket.gethostname()})
            try:
                self._run(['subvolume', 'snapshot', '-r', self.path, path],
                          'cannot take snapshot %s' % name)
            except ReplicationError:
                self._drop_meta(name)
                raise
            state['seq'] = seq
            state['live'] = name
        return Snapshot(name, seq, token, path)

    def prune(self, keep, protect=()):
        """Delete old snapshots: keep the newest ``keep``, the newest one
        each peer has, the one the live volume descends from, ``protect``,
        what ``retention`` keeps, and the two newest that an export of this
        host marked (:func:`slaposha.backup.export`: the one being written
        and the parent of the next incremental one). Returns the names
        deleted."""
        deleted = []
        with self._locked() as state:
            snapshots = self.snapshots()
            keepers = set(s.name for s in snapshots[-keep:]) if keep else set()
            keepers.update(self.exported(snapshots))
            if self.retention:
                keepers.update(self.retention.keepers(
                    [s.name for s in snapshots],
                    lambda name: self.meta(name).get('created')))
            keepers.update(state['peers'].values())
            keepers.update(protect)
            if state['live']:
                keepers.add(state['live'])
            for snap in snapshots:
                if snap.name not in keepers:
                    self._delete_subvolume(snap.path, 'cannot delete old'
                                           ' snapshot %s' % snap.name)
                    self._drop_meta(snap.name)
                    deleted.append(snap.name)
        return deleted

    def exported(self, snapshots=None):
        """The two newest snapshots that an export on this host marked
        (:func:`slaposha.backup.export`): the one being written and the
        parent of the next incremental one. The owner names them to its
        standbys with each snapshot it sends, and they keep them too."""
        snapshots = self.snapshots() if snapshots is None else snapshots
        return [s.name for s in snapshots
                if self.meta(s.name).get('exported')][-2:]

    def mark_exported(self, names):
        """Mark snapshots ``names`` (those here) as the owner marked them:
        kept here too, and after a takeover the new owner's first export
        can be incremental against the last one."""
        for name in names:
            if self.get(name) is None:
                continue
            meta = self.meta(name)
            if not meta.get('exported'):
                meta['exported'] = time.time()
                try:
                    self._write_meta(name, meta)
                except OSError:
                    pass  # deleted meanwhile

    # -- freshness and tokens -------------------------------------------------

    def freshness(self):
        """(seconds since the newest complete snapshot was taken, its name);
        (None, None) when there is none. On a standby: how old its copy is."""
        snapshots = self.snapshots()
        # A received snapshot is read-only once btrfs receive ends, its
        # meta written a moment later by the receiver: until then the
        # copy that counts is the one before (a receive stopped in that
        # moment made a standby "without a copy" for as long).
        for snapshot in reversed(snapshots):
            created = self.meta(snapshot.name).get('created')
            if created is not None:
                return max(0.0, self.clock() - created), snapshot.name
        return None, snapshots[-1].name if snapshots else None

    def newest_token(self):
        return self.state()['token']

    def raise_token(self, token):
        """Remember ``token`` as seen; StaleToken when a newer one was."""
        with self._locked() as state:
            self._check_token(state, token)
            state['token'] = token

    # -- where the service runs -----------------------------------------------

    def activate(self, token, host=None):
        """The service starts here as owner of epoch ``token``: remember the
        token (StaleToken if a newer owner already wrote here), mark the
        volume in use, and make sure the live volume holds the newest data
        (promote the newest snapshot if it is newer than what the live
        volume descends from; create an empty volume the very first time).
        Returns one line saying what was done."""
        with self._locked() as state:
            self._take_token(state, token)
            self._mark_active(state, token)
            return self._promote(state, create=True)

    def deactivate(self):
        with self._locked() as state:
            state['active'] = None

    # -- takeover -------------------------------------------------------------

    def promote(self):
        """Make the newest complete snapshot the writable volume, unless the
        live volume already descends from it. What the live volume held that
        no snapshot has is kept aside. Returns one line."""
        with self._locked() as state:
            return self._promote(state)

    def _promote(self, state, create=False):
        newest = self.newest()
        if self.exists():
            if newest is None:
                return 'kept %s: there is no snapshot' % self.path
            if state['live'] == newest.name:
                return 'kept %s: it follows the newest snapshot %s' % (
                    self.path, newest.name)
            notes = self._settle_live(state, newest, 'promote of %s'
                                      % newest.name)
        elif newest is None:
            if not create:
                raise self.error('nothing to promote: no volume and no'
                                 ' complete snapshot')
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._run(['subvolume', 'create', self.path],
                      'cannot create the volume')
            return 'created an empty volume %s' % self.path
        else:
            notes = []
        started = time.monotonic()
        self._run(['subvolume', 'snapshot', newest.path, self.path],
                  'cannot promote %s' % newest.name)
        state['live'] = newest.name
        return '; '.join(['promoted %s to %s in %.2f s' % (
            newest.name, self.path, time.monotonic() - started)] + notes)

    # -- divergence -----------------------------------------------------------

    def changed_since(self, base):
        """Whether the live volume holds changes after snapshot ``base``
        (access times aside), from a metadata-only incremental send."""
        probes = self._folder('.probe')
        for entry in os.listdir(probes):  # left by a crash
            self._delete_subvolume(os.path.join(probes, entry),
                                   'cannot delete an old probe snapshot')
        probe = os.path.join(probes, 'probe-%d-%s' % (
            os.getpid(), os.urandom(4).hex()))
        self._run(['subvolume', 'snapshot', '-r', self.path, probe],
                  'cannot take a probe snapshot')
        try:
            return self._compare(base, probe)
        finally:
            self._delete_subvolume(probe, 'cannot delete a probe snapshot')

    def _compare(self, base, probe):
        # The stream is read here, to its end, and counted as a stream sent
        # to a peer is (Changes). Piped into ``btrfs receive --dump``
        # instead, about one comparison in a few dozen failed: the dump
        # ended (status 0) after the stream's first command while send
        # still wrote, send died of SIGPIPE with nothing on stderr, and a
        # volume that held nothing new was kept aside with an empty reason.
        changes = Changes()
        with tempfile.TemporaryFile() as err:
            try:
                send = subprocess.Popen(
                    ['btrfs', 'send', '-q', '--no-data', '-p', base.path,
                     probe], stdout=subprocess.PIPE, stderr=err,
                    stdin=subprocess.DEVNULL)
            except OSError as e:
                raise self.error('cannot compare with %s: cannot run btrfs:'
                                 ' %s' % (base.name, e.strerror or e))
            try:
                while True:
                    data = send.stdout.read(CHUNK)
                    if not data:
                        break
                    changes.feed(data)
            finally:
                send.stdout.close()
                code = send.wait()
            if code:
                raise self.error('cannot compare with %s: %s' % (
                    base.name, stderr_text(err) or exit_reason(code)))
        return changes.changed

    def _set_aside(self, state, path, what, reason, token=None):
        # A read-only snapshot cannot leave its folder (see above).
        if os.path.dirname(path) == self.snapdir:
            folder, prefix = self.snapdir, 'diverged-'
        else:
            folder, prefix = self.diverged_dir, ''
        os.makedirs(folder, exist_ok=True)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = os.path.join(folder, '%s%s-%s' % (prefix, stamp, what))
        n = 1
        while os.path.lexists(target):
            n += 1
            target = os.path.join(folder, '%s%s-%s.%d' % (
                prefix, stamp, what, n))
        try:
            os.rename(path, target)
        except OSError as e:
            raise self.error('cannot set %s aside to %s: %s' % (
                path, target, e.strerror or e))
        self._record_diverged(state, target, reason, token)
        logger.warning('%s: diverged: %s kept aside as %s (%s)',
                       self.path, what, target, reason)
        return 'kept %s aside as %s (%s)' % (what, target, reason)

    def _settle_live(self, state, follows, why):
        """The live volume is to give way to snapshot ``follows`` (None: a
        full stream, nothing in common). It is deleted when it holds nothing
        that is not in a snapshot of the lineage, else set aside. The state
        forgets which snapshot the live volume follows only once it is gone:
        a step that fails leaves it as it was, for the next try."""
        base = self.get(state['live']) if state['live'] else None
        if state['active'] is not None and not alive(state['active']):
            state['active'] = None
        # The epoch that wrote it: the owner's whose snapshot it follows.
        token = base.token if base is not None else None
        if base is None:
            if not os.listdir(self.path):
                self._delete_subvolume(self.path, 'cannot delete the empty'
                                       ' volume')
                notes = ['deleted the empty volume']
            else:
                notes = [self._set_aside(state, self.path, 'volume', 'it has'
                                         ' data of no known snapshot; %s'
                                         % why, token)]
        elif follows is None or base.key > follows.key:
            notes = [self._set_aside(state, self.path, 'volume', 'it follows'
                                     ' %s, which the new owner does not have;'
                                     ' %s' % (base.name, why), token)]
        else:
            try:
                changed = self.changed_since(base)
                reason = 'it was written after %s' % base.name
            except ReplicationError as e:
                # Unknown: keeping it is always safe.
                changed, reason = True, 'no comparison with %s (%s)' % (
                    base.name, e.message)
            if changed:
                notes = [self._set_aside(state, self.path, 'volume', '%s; %s'
                                         % (reason, why), token)]
            else:
                try:
                    self._delete_subvolume(self.path, 'cannot delete the'
                                           ' volume')
                    notes = ['deleted %s: it held nothing after %s' % (
                        self.path, base.name)]
                except ReplicationError:
                    # E.g. a nested subvolume in it: keeping is always safe.
                    notes = [self._set_aside(state, self.path, 'volume', 'it'
                                             ' could not be deleted; %s'
                                             % why, token)]
        state['live'] = None
        return notes

    def _follow(self, state, parent, sender, token):
        """Before a stream of ``sender`` (epoch ``token``) that follows
        snapshot ``parent`` lands: what of this host's is not in that
        lineage (written after ``parent``) is set aside."""
        notes = []
        why = 'the stream of %s (token %d) follows %s' % (
            sender, token, parent.name if parent else 'no common snapshot')
        if self.exists():
            notes += self._settle_live(state, parent, why)
        if parent is not None:
            for snap in self.snapshots():
                if snap.key > parent.key:
                    notes.append(self._set_aside(state, snap.path, snap.name,
                                                 'not on %s; %s' % (sender,
                                                                    why),
                                                 snap.token))
                    self._drop_meta(snap.name)
        return notes

    def _remove_copy(self, path, wait=False):
        """Delete a diverged copy (a subvolume, writable or not)."""
        self._delete_subvolume(path, 'cannot delete the diverged copy %s'
                               % path)

    # -- status ---------------------------------------------------------------

    def status(self):
        """What this host holds of the volume, as a dict (JSON-able)."""
        state = self.state()
        lag, newest = self.freshness()
        return {
            'volume': self.path, 'exists': self.exists(),
            'snapshots': [s.name for s in self.snapshots()],
            'newest': newest, 'lag': lag, 'token': state['token'],
            'live': state['live'], 'peers': state['peers'],
            'active': self._active_token(state),
            'diverged': self._present_diverged(state),
        }


def exit_reason(code):
    """What a child's return ``code`` says, for an error without a message
    of its own."""
    if code < 0:
        try:
            return 'btrfs send killed by %s' % signal.Signals(-code).name
        except ValueError:
            return 'btrfs send killed by signal %d' % -code
    return 'btrfs send exit %d' % code


class Changes(object):
    """Whether a ``btrfs send`` stream changes anything, read from the
    headers of its commands as the stream goes by (each: length, command,
    checksum; the same in every version of the stream): an increment of an
    untouched volume holds only its ``snapshot`` command and the ``end``,
    and one whose only change is a read's access time adds ``utimes``
    (as :meth:`Volume.changed_since` counts)."""

    HEADER = 17                     # "btrfs-stream\0", version
    COMMAND = struct.Struct('<IHI')
    QUIET = frozenset((1, 2, 20, 21))  # subvol, snapshot, utimes, end

    def __init__(self):
        self.changed = False
        self._skip = self.HEADER    # bytes to pass before the next command
        self._head = b''            # a command header cut between reads

    def feed(self, data):
        at, size = 0, len(data)
        while not self.changed and at < size:
            if self._skip:
                step = min(self._skip, size - at)
                self._skip -= step
                at += step
                continue
            take = self.COMMAND.size - len(self._head)
            self._head += data[at:at + take]
            at += take
            if len(self._head) == self.COMMAND.size:
                length, command, _ = self.COMMAND.unpack(self._head)
                self._head = b''
                self._skip = length
                self.changed = command not in self.QUIET
