"""btrfs snapshots sent to the standbys, tagged with the owner's epoch.

Why snapshots (reference/replication.md, section 2): a read-only btrfs
snapshot is atomic, so every copy a standby holds is what a power cut at that
instant would have left, which is what databases recover from (rsync of a
live folder mixes transactions); and btrfs knows what changed between two
snapshots without scanning, so a cycle after a small change costs a fraction
of a second whatever the number of files.

The pieces, each a small step:

- :class:`Volume`: the protected btrfs subvolume (e.g. /srv/slapgrid) and,
  on the same file system, its snapshots and state. ``snapshot(token)``,
  ``prune(keep)``, ``promote()``, ``freshness()``, ``status()``.
- :class:`Sender` (on the owner): ``send()`` sends a read-only snapshot to
  one standby incrementally from the newest snapshot that standby confirms
  it has (a full send when none); one ``cycle()`` takes a snapshot, sends
  it to every standby at once, then prunes; ``progress`` tells how a
  transfer goes. The driver runs it without pause with
  :class:`slaposha.replication.pacer.Pacer` (each standby at its own pace).
- :class:`Receiver` (on every host): a TLS server that answers which
  snapshots it has, and pipes a stream into ``btrfs receive``. A snapshot is
  complete only when the whole stream came and ``btrfs receive`` finished
  it (it makes it read-only last); anything else is deleted at once.

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
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections import namedtuple

from slaposha.api.server import Clients
from slaposha.replication import (
    Peer, Progress, ReplicationError, StaleToken, human_bytes, locked_state,
    trim)
from slaposha.inputs import cut, one_line
from slaposha.replication import wire
from slaposha.proc import boot_id, mount_holding, start_time
from slaposha.replication.diverged import DivergedCopies

__all__ = ['Volume', 'Snapshot', 'Sender', 'Receiver', 'Transfer', 'Cycle',
           'DEFAULT_PORT', 'snapshot_name']

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1216
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

# One send to one peer: ``skipped`` when the peer had the snapshot already;
# ``acked``: when the peer confirmed it has it (wall clock); ``changed``:
# whether the stream changed anything (see _Changes; None when skipped).
Transfer = namedtuple('Transfer', 'peer snapshot parent bytes seconds'
                      ' skipped acked changed')

# One replication cycle: the snapshot taken, when (wall clock) and how long,
# a Transfer per peer that got it, the ReplicationError of each that did
# not (under None: the pruning's).
Cycle = namedtuple('Cycle', 'snapshot started seconds results errors')


def snapshot_name(seq, token):
    return '%06d-%d' % (seq, token)


# fcntl.F_SETPIPE_SZ (Python 3.10+).
_SETPIPE_SZ = getattr(fcntl, 'F_SETPIPE_SZ', 1031)


def _widen(pipe):
    """A pipe of 1 MiB instead of 64 KiB: fewer wake-ups and frames per
    stream, which counts on a host with few cores."""
    try:
        fcntl.fcntl(pipe.fileno(), _SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default works too


def _read_only(path):
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


def _is_subvolume(path):
    try:
        return os.lstat(path).st_ino == _SUBVOL_INODE and os.path.isdir(path)
    except OSError:
        return False


_libc = None


def _syncfs(path):
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


def _stderr(f):
    f.seek(0)
    return trim(f.read().decode(errors='replace'))


# -- the volume ---------------------------------------------------------------

def _volume_defaults():
    return {'token': 0, 'seq': 0, 'live': None, 'peers': {}, 'diverged': [],
            'active': None}


class Volume(DivergedCopies):
    """A btrfs subvolume that slaposha protects, and its snapshots on the
    same file system. Every step runs in the caller's mount namespace (the
    host's)."""

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

    def __str__(self):
        return self.path

    def error(self, message, peer=None, incoming=False):
        return ReplicationError(self.path, message, peer, incoming)

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

    def _locked(self):
        """The state, locked against the other processes and threads of
        the host (a receiver and the agent); written back if changed."""
        return locked_state(os.path.join(self.snapdir, '.state.json'),
                            _volume_defaults, self.error)

    def state(self):
        with self._locked() as state:
            return dict(state)

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
        if not _is_subvolume(path) or _read_only(path) is not True:
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
        return [p for p in paths if _is_subvolume(p) and
                _read_only(p) is False]

    def _receiving(self):
        """A lock held while a stream comes in (a file descriptor to close),
        or None when another stream holds it."""
        os.makedirs(self.snapdir, exist_ok=True)
        fd = os.open(os.path.join(self.snapdir, '.receiving'),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fd

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
        newest = self.newest()
        if newest is None:
            return None, None
        created = self.meta(newest.name).get('created')
        if created is None:
            return None, newest.name
        return max(0.0, self.clock() - created), newest.name

    def newest_token(self):
        return self.state()['token']

    def raise_token(self, token):
        """Remember ``token`` as seen; StaleToken when a newer one was."""
        with self._locked() as state:
            if token < state['token']:
                raise StaleToken(self.path, 'token %d is stale: token %d was'
                                 ' seen here' % (token, state['token']))
            state['token'] = token

    # -- where the service runs -----------------------------------------------

    @staticmethod
    def _alive(active):
        return bool(active) and active.get('boot') == boot_id() and \
            start_time(active.get('pid', -1)) == active.get('start')

    def active(self):
        """The token of the owner running the service here, or None. A
        marker left by a process that died (a crash) does not count."""
        state = self.state()
        return state['active']['token'] if self._alive(state['active']) \
            else None

    def activate(self, token, host=None):
        """The service starts here as owner of epoch ``token``: remember the
        token (StaleToken if a newer owner already wrote here), mark the
        volume in use, and make sure the live volume holds the newest data
        (promote the newest snapshot if it is newer than what the live
        volume descends from; create an empty volume the very first time).
        Returns one line saying what was done."""
        with self._locked() as state:
            if token < state['token']:
                raise StaleToken(self.path, 'token %d is stale: a newer owner'
                                 ' (token %d) sent data here' % (
                                     token, state['token']))
            state['token'] = token
            pid = os.getpid()
            state['active'] = {'pid': pid, 'start': start_time(pid),
                               'boot': boot_id(), 'token': token}
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
        # to a peer is (_Changes). Piped into ``btrfs receive --dump``
        # instead, about one comparison in a few dozen failed: the dump
        # ended (status 0) after the stream's first command while send
        # still wrote, send died of SIGPIPE with nothing on stderr, and a
        # volume that held nothing new was kept aside with an empty reason.
        changes = _Changes()
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
                    base.name, _stderr(err) or _exit(code)))
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
        state['diverged'].append({'path': target, 'at': time.time(),
                                  'reason': reason, 'token': token})
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
        if state['active'] is not None and not self._alive(state['active']):
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
            'active': state['active']['token'] if self._alive(
                state['active']) else None,
            'diverged': [d for d in state['diverged']
                         if os.path.lexists(d['path'])],
        }


def _exit(code):
    """What a child's return ``code`` says, for an error without a message
    of its own."""
    if code < 0:
        try:
            return 'btrfs send killed by %s' % signal.Signals(-code).name
        except ValueError:
            return 'btrfs send killed by signal %d' % -code
    return 'btrfs send exit %d' % code


def _dump_commands(stream):
    """(command, whole line) of each command of a send stream, via
    ``btrfs receive --dump``."""
    dump = subprocess.Popen(['btrfs', 'receive', '--dump'], stdin=stream,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            universal_newlines=True)
    commands = []
    for line in dump.stdout:
        fields = line.split(None, 2)
        if fields:
            commands.append((fields[0], line))
    dump.wait()
    return commands


class _Changes(object):
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


# -- the owner's side ---------------------------------------------------------

class Sender(object):
    """Sends the snapshots of a volume to its standbys, as the owner of
    epoch ``token``.

    ``peers``: Peer(name, address, port) of each standby's receiver;
    ``tls``: (ca, cert, key) of this host; ``host``: this host's name (as in
    its certificate). ``keep``: snapshots kept here and on the standbys
    (besides the newest each peer has). ``timeout``: a transfer with no
    progress for this long is abandoned.

    ``progress`` is the transfer that began last (a :class:`Progress`),
    going on or not; ``sending`` maps each peer to the one going on to it;
    ``last`` maps each peer to its last Transfer or error. Sends to
    different peers may run at once (each in its own thread), one at a
    time to a given peer.
    """

    def __init__(self, volume, token, peers, tls, host, keep=3, timeout=30.0,
                 connect_timeout=3.0, estimate='auto'):
        self.volume = volume if isinstance(volume, Volume) else Volume(volume)
        self.token = token
        self.peers = [p if isinstance(p, Peer) else Peer(*p) for p in peers]
        self.tls = tls
        self.host = host
        self.keep = keep
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.estimate = estimate
        self.progress = None
        self.sending = {}
        self.last = {}
        self._revoked = None
        self._took = {}
        self._aborted = threading.Event()
        self._lock = threading.Lock()
        # {peer name: the btrfs send, the channel, the snapshots it uses}
        # of each send going on: abort() ends them, prune() spares them.
        self._procs = {}
        self._channels = {}
        self._using = {}
        # Held while snapshots are pruned, and while a send picks its
        # parent: a send never starts from a snapshot being deleted.
        self._pruning = threading.Lock()

    def error(self, message, peer):
        return self.volume.error(message, peer.name if peer else None)

    # -- one cycle ------------------------------------------------------------

    def cycle(self):
        """Snapshot, send to every peer at once (one thread each: a dead
        one delays only its own copy), prune. Returns a Cycle once every
        send ended; a peer's failure is in its ``errors``, not raised (the
        next cycle retries). Raises ReplicationError when the snapshot
        itself fails."""
        started = time.time()
        snap = self.volume.snapshot(self.token, self.host)
        results, errors = {}, {}

        def one(peer):
            try:
                results[peer.name] = self.send(peer, snap)
            except ReplicationError as e:
                errors[peer.name] = e
        threads = [threading.Thread(target=one, args=(peer,), daemon=True,
                                    name='send to %s' % peer.name)
                   for peer in self.peers[1:]]
        for thread in threads:
            thread.start()
        for peer in self.peers[:1]:
            one(peer)
        for thread in threads:
            thread.join()
        try:
            self.prune()
        except ReplicationError as e:
            errors[None] = e
        return Cycle(snap, started, time.time() - started, results, errors)

    def prune(self):
        """Delete old snapshots here (:meth:`Volume.prune` with ``keep``),
        never one that a send going on uses."""
        with self._pruning:
            with self._lock:
                using = set(n for names in self._using.values()
                            for n in names if n)
            return self.volume.prune(self.keep, protect=using)

    def abort(self):
        """Stop the transfers going on, from another thread, at once, and
        any later one: a new Sender goes on."""
        self._aborted.set()
        with self._lock:
            procs = list(self._procs.values())
            channels = list(self._channels.values())
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for channel in channels:
            try:
                channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def lag(self, peer_name):
        """(seconds since the newest snapshot ``peer_name`` has was taken,
        its name), or (None, None)."""
        name = self.volume.state()['peers'].get(peer_name)
        if not name:
            return None, None
        created = self.volume.meta(name).get('created')
        return (max(0.0, self.volume.clock() - created) if created
                else None), name

    # -- talking to one peer --------------------------------------------------

    def _connect(self, peer):
        try:
            channel = wire.connect(peer.address, peer.port, peer.name,
                                   self.tls, self.connect_timeout)
        except ssl.SSLError as e:
            raise self.error('TLS with %s:%d failed: %s' % (
                peer.address, peer.port, trim(e.reason or str(e))), peer)
        except OSError as e:
            raise self.error('cannot connect to %s:%d: %s' % (
                peer.address, peer.port, e.strerror or e), peer)
        try:
            if self._revoked is None:
                self._revoked = wire.revocations(self.tls)
            wire.check_host(channel.sock, self._revoked, [peer.name])
        except wire.WireError as e:
            channel.close()
            raise self.error('%s:%d: %s' % (peer.address, peer.port, e),
                             peer)
        channel.settimeout(self.timeout)
        with self._lock:
            self._channels[peer.name] = channel
        if self._aborted.is_set():
            channel.close()
            raise self.error('aborted', peer)
        return channel

    def _answer(self, channel, peer, what):
        try:
            answer = channel.recv_json()
        except (OSError, wire.WireError) as e:
            answer = e
        if self._aborted.is_set() and not isinstance(answer, dict):
            # Our own abort closed it (a stop cut short, a fence): not
            # the peer's doing.
            raise self.error('%s: aborted' % what, peer)
        if isinstance(answer, socket.timeout):
            raise self.error('%s: no answer within %gs' % (what, self.timeout),
                             peer)
        if isinstance(answer, Exception):
            raise self.error('%s: connection lost: %s' % (
                what, getattr(answer, 'strerror', None) or answer), peer)
        if answer is None:
            raise self.error('%s: connection closed without an answer'
                             % what, peer)
        if not answer.get('ok'):
            error = answer.get('error') or 'refused'
            cls = StaleToken if answer.get('stale') else ReplicationError
            raise cls(self.volume.path, '%s refused: %s' % (what, error),
                      peer.name)
        return answer

    def query(self, peer, channel=None):
        """What the peer holds of the volume: {snapshots, token, active,
        diverged, ...}."""
        own = channel is None
        channel = channel or self._connect(peer)
        try:
            channel.send_json({'op': 'list', 'volume': self.volume.path})
            return wire.check_answer(self._answer(channel, peer, 'list'),
                                     'list')
        except OSError as e:
            raise self.error('list: %s' % (e.strerror or e), peer)
        except wire.WireError as e:
            raise self.error(str(e), peer)
        finally:
            if own:
                channel.close()

    def _estimate(self, peer, snap, parent):
        """Bytes the stream will carry, roughly; None when unknown or not
        worth the cost (a quick increment)."""
        if parent is None:
            try:
                p = self.volume._run(['filesystem', 'du', '-s', '--raw',
                                      snap.path], 'du')
            except ReplicationError:
                return None
            lines = p.stdout.strip().splitlines()
            try:
                return int(lines[-1].split()[0])
            except (IndexError, ValueError):
                return None
        if self.estimate == 'never' or (self.estimate == 'auto' and
                                        self._took.get(peer.name, 0) < 1.0):
            return None
        with tempfile.TemporaryFile() as err:
            send = subprocess.Popen(
                ['btrfs', 'send', '-q', '--no-data', '-p', parent.path,
                 snap.path], stdout=subprocess.PIPE, stderr=err,
                stdin=subprocess.DEVNULL)
            try:
                commands = _dump_commands(send.stdout)
            finally:
                send.stdout.close()
                send.wait()
        total = 0
        for command, line in commands:
            if command == 'update_extent':
                m = re.search(r' len=([0-9]+)', line)
                total += int(m.group(1)) if m else 0
        return total

    def send(self, peer, snap):
        """Send snapshot ``snap`` to ``peer``, incrementally from the newest
        snapshot it has. Returns a Transfer; raises ReplicationError (and
        StaleToken when the peer has seen a newer epoch than ours)."""
        peer = peer if isinstance(peer, Peer) else Peer(*peer)
        with self._pruning:
            if self.volume.get(snap.name) is None:
                error = self.error('send %s: pruned before it could be sent'
                                   % snap.name, peer)
                self.last[peer.name] = error
                raise error
            with self._lock:
                self._using[peer.name] = (snap.name, None)
        try:
            return self._send_over(peer, snap)
        except ReplicationError as e:
            self.last[peer.name] = e
            raise
        finally:
            with self._lock:
                self._using.pop(peer.name, None)

    def _send_over(self, peer, snap):
        if self._aborted.is_set():
            raise self.error('send %s: aborted' % snap.name, peer)
        channel = self._connect(peer)
        try:
            return self._send(channel, peer, snap)
        except OSError as e:
            if self._aborted.is_set():
                raise self.error('send %s: aborted' % snap.name, peer)
            raise self.error('send %s: %s' % (snap.name, e.strerror or e),
                             peer)
        finally:
            with self._lock:
                progress = self.sending.pop(peer.name, None)
                proc = self._procs.pop(peer.name, None)
                self._channels.pop(peer.name, None)
            if progress is not None and progress.ended is None:
                progress.ended = time.monotonic()
                progress.failed = True
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            channel.close()

    def _send(self, channel, peer, snap):
        held = self.query(peer, channel)
        if held.get('token', 0) > self.token:
            raise StaleToken(self.volume.path, 'it has seen token %d,'
                             ' ours is %d: this host is no longer the'
                             ' owner' % (held['token'], self.token),
                             peer.name)
        if held.get('active') is not None:
            raise self.error('the service runs there (token %s)'
                             % held['active'], peer)
        theirs = set(held.get('snapshots', ()))
        if snap.name in theirs:
            return self._had(peer, snap)
        with self._pruning:
            parent = None
            for candidate in reversed(self.volume.snapshots()):
                if candidate.key < snap.key and candidate.name in theirs:
                    parent = candidate
                    break
            with self._lock:
                self._using[peer.name] = (snap.name, parent and parent.name)
        total = self._estimate(peer, snap, parent)
        channel.send_json({
            'op': 'receive', 'volume': self.volume.path,
            'snapshot': snap.name, 'parent': parent and parent.name,
            'token': self.token, 'sender': self.host, 'size': total,
            'created': self.volume.meta(snap.name).get('created'),
            'keep': self.keep, 'exported': self.volume.exported()})
        go = self._answer(channel, peer, 'send %s' % snap.name)
        if go.get('have'):
            return self._had(peer, snap)
        progress = self.progress = Progress(
            peer.name, snap.name, parent and parent.name, total)
        changes = _Changes()
        with self._lock:
            self.sending[peer.name] = progress
        with tempfile.TemporaryFile() as err:
            args = ['btrfs', 'send', '-q'] + (
                ['-p', parent.path] if parent else []) + [snap.path]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                                    stderr=err, stdin=subprocess.DEVNULL)
            _widen(proc.stdout)
            with self._lock:
                self._procs[peer.name] = proc
            self._stream(channel, peer, proc, progress, changes)
            code = proc.wait()
            if code:
                # No end frame: the receiver drops what it got.
                if self._aborted.is_set():
                    raise self.error('send %s: aborted' % snap.name,
                                     peer)
                raise self.error('btrfs send of %s failed: %s' % (
                    snap.name, _stderr(err) or 'exit %d' % code), peer)
        try:
            channel.end_frames()
        except OSError as e:
            raise self._cut(channel, peer, snap.name, e)
        answer = self._answer(channel, peer, 'send %s' % snap.name)
        acked = time.time()
        progress.ended = time.monotonic()
        self._took[peer.name] = progress.seconds
        self._confirmed(peer, snap.name)
        result = Transfer(peer.name, snap.name, parent and parent.name,
                          progress.sent, progress.seconds, False, acked,
                          changes.changed)
        self.last[peer.name] = result
        logger.debug('%s -> %s: %s (%s)', self.volume.path, peer.name,
                     snap.name, answer.get('notes'))
        return result

    def _had(self, peer, snap):
        """The peer has ``snap`` already."""
        self._confirmed(peer, snap.name)
        result = Transfer(peer.name, snap.name, None, 0, 0.0, True,
                          time.time(), None)
        self.last[peer.name] = result
        return result

    def _stream(self, channel, peer, proc, progress, changes):
        fd = proc.stdout.fileno()
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    return
                changes.feed(data)
                try:
                    channel.send_frame(data)
                except socket.timeout:
                    raise self.error('send %s: no progress within %gs' % (
                        progress.snapshot, self.timeout), peer)
                except OSError as e:
                    raise self._cut(channel, peer, progress.snapshot, e)
                progress.sent += len(data)
        finally:
            proc.stdout.close()

    def _cut(self, channel, peer, name, e):
        """The connection broke while sending: the receiver may have said
        why before it closed."""
        if self._aborted.is_set():
            return self.error('send %s: aborted' % name, peer)
        try:
            channel.settimeout(1.0)
            answer = channel.recv_json()
        except (OSError, wire.WireError):
            answer = None
        if answer and not answer.get('ok'):
            return self.error('send %s refused: %s' % (
                name, answer.get('error')), peer)
        return self.error('send %s: connection lost: %s' % (
            name, getattr(e, 'strerror', None) or e), peer)

    def _confirmed(self, peer, name):
        with self.volume._locked() as state:
            state['peers'][peer.name] = name


# -- every host's side --------------------------------------------------------

class Receiver(object):
    """Receives the snapshots of ``volumes`` (their paths) from their
    owners: a TLS server on ``address:port`` with this host's certificate
    (``tls`` = (ca, cert, key)); clients must show one of the same CA.

    Run it in a thread (``start()`` / ``stop()``) or in the foreground
    (``serve_forever()``). ``idle_timeout``: a stream that stalls this long
    (the sender's host died) is dropped. Only hosts of the cluster are
    served (certificates of the host role, not revoked; with ``hosts``, one
    of those names). At most ``max_connections`` connections at once, and
    ``max_peer_connections`` from one address: one beyond is closed at once,
    and logged once with the peer until that peer is served again (a peer
    that keeps trying does not fill the log).

    The conversation (:mod:`slaposha.replication.wire`), one connection
    per send: ``{"op": "list", "volume": V}`` answers this host's status of
    V (complete snapshots, newest token seen, whether the service runs
    here); ``{"op": "receive", "volume", "snapshot", "parent", "token",
    "sender", "created", "size", "keep"}`` answers a refusal with its
    reason, or a go-ahead; then come the frames of the ``btrfs send``
    stream, then the answer: received, or why not.
    """

    def __init__(self, address, port, tls, volumes, idle_timeout=10.0,
                 hosts=None, handlers=None, max_connections=128,
                 max_peer_connections=32):
        self.address = address
        self.port = port
        self.tls = tls
        self.hosts = hosts
        # Other engines' requests on the same port, after the same TLS
        # check: {op: f(channel, request, sender) -> connection goes on}
        # (rsync: slaposha.replication.rsync.TreeReceiver.handlers).
        self.handlers = dict(handlers or {})
        self.volumes = {}
        for path in volumes:
            volume = path if isinstance(path, Volume) else Volume(path)
            self.volumes[volume.path] = volume
        self.idle_timeout = idle_timeout
        try:
            self._context = wire.server_context(tls)
            self._revoked = wire.revocations(tls)
        except (OSError, wire.WireError) as e:
            raise ReplicationError(', '.join(self.volumes) or 'receiver',
                                   'cannot use the certificates %s: %s' % (
                                       ', '.join(tls), e))
        self._sock = None
        self._thread = None
        self._stopping = threading.Event()
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._peers = Clients(max_peer_connections)
        self._refused = set()   # peers refused since they were last served
        self._lock = threading.Lock()

    def __repr__(self):
        return '<Receiver %s:%d %s>' % (self.address, self.port,
                                        ' '.join(self.volumes))

    # -- life cycle -----------------------------------------------------------

    def listen(self):
        family = socket.AF_INET6 if ':' in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.address, self.port))
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise ReplicationError(' '.join(self.volumes) or 'receiver',
                                   'cannot listen on %s:%d: %s' % (
                                       self.address, self.port,
                                       e.strerror or e))
        sock.settimeout(0.5)
        self._sock = sock
        for volume in self.volumes.values():
            try:
                busy = volume._receiving()
            except (ReplicationError, OSError):
                continue  # not mounted yet: cleared before each stream
            if busy is None:
                continue
            try:
                for path in volume._partial():
                    volume._drop_partial(path)
            except ReplicationError as e:
                logger.warning('%s', e)
            finally:
                os.close(busy)
        return self

    def start(self):
        """Serve in a background thread."""
        if self._sock is None:
            self.listen()
        self._thread = threading.Thread(target=self.serve_forever,
                                        name='receiver', daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        if self._sock is None:
            self.listen()
        logger.info('receiver on %s:%d for %s', self.address, self.port,
                    ', '.join(self.volumes))
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            self._accepted(conn, addr)

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- one connection -------------------------------------------------------

    def _accepted(self, conn, addr):
        """Serve ``conn`` in a thread of its own, within the limits."""
        peer = addr[0]
        if not self._slots.acquire(blocking=False):
            why = '%d connections open (the limit, [replication]' \
                ' max_connections)' % self.max_connections
        elif not self._peers.take(peer):
            self._slots.release()
            why = 'it has %d connections open (the limit of one peer,' \
                ' [replication] max_peer_connections)' % self._peers.limit
        else:
            with self._lock:
                self._refused.discard(peer)
            try:
                threading.Thread(target=self._serve_within, daemon=True,
                                 args=(conn, addr)).start()
            except BaseException:
                self._peers.give(peer)
                self._slots.release()
                conn.close()
                raise
            return
        with self._lock:
            first = peer not in self._refused
            self._refused.add(peer)
        if first:
            logger.warning('receiver: %s refused: %s; its next refusals are'
                           ' not logged until it is served again', peer, why)
        conn.close()

    def _serve_within(self, conn, addr):
        try:
            self._serve(conn, addr)
        finally:
            self._peers.give(addr[0])
            self._slots.release()

    def _serve(self, conn, addr):
        conn.settimeout(self.idle_timeout)
        # An answer goes at once, not after the sender's delayed ack of the
        # TLS session tickets sent before it (40 ms a cycle: Nagle).
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            sock = self._context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as e:
            logger.warning('receiver: TLS with %s failed: %s', addr[0],
                           trim(str(e)))
            conn.close()
            return
        channel = wire.Channel(sock)
        peer = addr[0]
        try:
            sender, refused = wire.check_host(sock, self._revoked,
                                              self.hosts), None
            peer = '%s (%s)' % (sender, addr[0])
        except wire.WireError as e:
            sender, refused = None, str(e)
        ops = set(['list', 'receive']) | set(self.handlers)
        try:
            while True:
                # A peer's request is refused here, in one line each (in
                # the log, with the peer, and to the peer), whatever it
                # sent: bytes that are no JSON line, a line too long or
                # that does not come whole in idle_timeout, a request
                # unknown or with fields of the wrong type.
                try:
                    request = channel.recv_json(within=self.idle_timeout)
                    if request is None:
                        return
                    if refused:
                        raise wire.WireError(refused)
                    op = wire.check_request(request, ops)
                except socket.timeout:
                    return wire.refuse(channel, peer, 'no whole request'
                                       ' within %g s' % self.idle_timeout)
                except wire.WireError as e:
                    return wire.refuse(channel, peer, str(e))
                if op == 'list':
                    answer = self._list(request)
                    if not answer['ok']:
                        return wire.refuse(channel, peer, answer['error'])
                    channel.send_json(answer)
                elif op == 'receive':
                    if not self._receive(channel, request, sender):
                        return
                elif not self.handlers[op](channel, request, sender):
                    return
        except (OSError, wire.WireError) as e:
            logger.debug('receiver: connection of %s: %s', peer, e)
        finally:
            channel.close()

    def _volume(self, request):
        volume = self.volumes.get(request['volume'])
        if volume is None:
            raise ReplicationError(cut(request['volume']), 'not a volume'
                                   ' this host receives (%s)' % (
                                       ', '.join(self.volumes) or 'none'))
        return volume

    def _list(self, request):
        try:
            volume = self._volume(request)
            status = volume.status()
        except (ReplicationError, OSError) as e:
            return {'ok': False, 'error': str(e)}
        status['ok'] = True
        return status

    def _receive(self, channel, request, who):
        """One stream. Returns whether the connection can carry another
        request."""
        sender = request['sender']
        try:
            volume = self._volume(request)
        except ReplicationError as e:
            return wire.refuse(channel, who, str(e))
        name, parent_name = request.get('snapshot'), request.get('parent')

        def refuse(message, stale=False):
            return wire.refuse(channel, who, str(volume.error(
                message, one_line(sender, 80), incoming=True)), stale=stale)

        if not NAME_RE.fullmatch(name) or (parent_name is not None and
                                           not NAME_RE.fullmatch(parent_name)):
            return refuse('bad snapshot names %s, %s' % (cut(name),
                                                         cut(parent_name)))
        if sender != who:
            return refuse('its certificate is for %s, not %s' % (
                who, cut(sender)))
        try:
            busy = volume._receiving()
        except ReplicationError as e:
            return refuse(e.message)
        except OSError as e:
            return refuse('cannot prepare: %s' % (e.strerror or e))
        if busy is None:
            return refuse('busy: another stream into this volume is running')
        try:
            return self._admit(channel, volume, request, sender, refuse)
        finally:
            os.close(busy)

    def _admit(self, channel, volume, request, sender, refuse):
        name, parent_name = request['snapshot'], request.get('parent')
        token = request['token']
        try:
            for path in volume._partial():
                volume._drop_partial(path)
            with volume._locked() as state:
                if token < state['token']:
                    return refuse('token %d is stale: token %d was seen here'
                                  % (token, state['token']), stale=True)
                if volume._alive(state['active']):
                    return refuse('the service runs on this host (token %d):'
                                  ' it receives nothing' %
                                  state['active']['token'])
                if volume.get(name) is not None:
                    channel.send_json({'ok': True, 'have': True})
                    return True
                parent = volume.get(parent_name) if parent_name else None
                if parent_name and parent is None:
                    return refuse('parent snapshot %s is not here'
                                  % parent_name)
                state['token'] = token
                notes = volume._follow(state, parent, sender, token)
        except ReplicationError as e:
            return refuse(e.message)
        except OSError as e:
            return refuse('cannot prepare: %s' % (e.strerror or e))
        channel.send_json({'ok': True, 'go': True, 'notes': notes})
        started = time.monotonic()
        path = os.path.join(volume.snapdir, name)
        try:
            size = self._stream(channel, volume, name, sender)
            with volume._locked() as state:
                # A stream of an older epoch that ends after a new owner
                # took over here is not kept (unless already promoted).
                if token < state['token'] and state['live'] != name:
                    raise volume.error('dropped %s: a newer owner (token %d)'
                                       ' took over during the stream' % (
                                           name, state['token']),
                                       sender, True)
                volume._write_meta(name, {
                    'created': request.get('created'), 'token': token,
                    'host': sender, 'parent': parent_name,
                    'received': time.time(), 'bytes': size})
                state['peers'][sender] = name
            _syncfs(volume.snapdir)
        except (ReplicationError, OSError) as e:
            if not isinstance(e, ReplicationError):
                e = volume.error('cannot keep %s: %s' % (
                    name, e.strerror or e), sender, True)
            try:
                if _is_subvolume(path):
                    volume._drop_partial(path)
            except ReplicationError as e2:
                logger.warning('%s', e2)
            logger.warning('%s', e)
            channel.send_json({'ok': False, 'error': str(e)})
            return False
        seconds = time.monotonic() - started
        logger.info('%s <- %s: received %s (%s in %.2f s, %s)%s',
                    volume.path, sender, name, human_bytes(size), seconds,
                    'after %s' % parent_name if parent_name else 'full',
                    ''.join('; ' + n for n in notes))
        channel.send_json({'ok': True, 'snapshot': name, 'bytes': size,
                           'seconds': seconds, 'notes': notes})
        # After the answer: the sender need not wait for the housekeeping.
        try:
            volume.mark_exported(request.get('exported') or ())
            volume.prune(max(1, int(request.get('keep') or 3)))
        except (ReplicationError, ValueError) as e:
            logger.warning('%s', e)
        return True

    def _stream(self, channel, volume, name, sender):
        """Pipe the frames into btrfs receive; returns the bytes received.
        Raises ReplicationError (the partial snapshot is the caller's to
        drop) unless the whole stream came and btrfs receive finished it."""
        size = 0
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(['btrfs', 'receive', '-q', volume.snapdir],
                                    stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err)
            _widen(proc.stdin)
            try:
                while True:
                    try:
                        data = channel.recv_frame()
                    except socket.timeout:
                        raise volume.error(
                            'stream of %s stalled for %gs: dropped' % (
                                name, self.idle_timeout), sender, True)
                    except (OSError, wire.WireError) as e:
                        raise volume.error('stream of %s cut after %s: %s' % (
                            name, human_bytes(size),
                            getattr(e, 'strerror', None) or e), sender, True)
                    if not data:
                        break
                    try:
                        proc.stdin.write(data)
                    except BrokenPipeError:
                        proc.wait()
                        raise volume.error('btrfs receive of %s failed: %s'
                                           % (name, _stderr(err)), sender,
                                           True)
                    size += len(data)
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    code = proc.wait(120)
                except subprocess.TimeoutExpired:
                    raise volume.error('btrfs receive of %s did not finish'
                                       % name, sender, True)
                if code:
                    raise volume.error('btrfs receive of %s failed: %s' % (
                        name, _stderr(err) or 'exit %d' % code), sender, True)
            finally:
                # Killed before its input ends: a cut stream is never
                # finished (made read-only) by btrfs receive.
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if volume.get(name) is None:
            raise volume.error('btrfs receive left no complete snapshot %s'
                               % name, sender, True)
        return size
