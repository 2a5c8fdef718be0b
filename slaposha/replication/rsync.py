"""rsync over the cluster's channel, tagged with the owner's epoch.

For hosts without btrfs, and for copying trees (software releases). The
real rsync binary does the work; slaposha only carries its byte stream over
the same TLS channel as the btrfs streams (:mod:`slaposha.replication.wire`:
cluster CA, host certificates, port 1216) and decides what a copy is worth:

- the owner runs ``rsync -aH --delete -e HELPER SRC/ peer:`` where HELPER
  is this module (``python -m slaposha.replication.rsync``): it opens the
  channel to the peer's receiver, sends one JSON request (the fencing
  token, the sender, the tree, rsync's server arguments) and, once
  admitted, relays rsync's stdin/stdout as frames, as ssh would;
- the peer's receiver (:class:`TreeReceiver`, served by the btrfs
  :class:`~slaposha.replication.btrfs.Receiver` on the same port) admits a
  request only from a host of the cluster whose certificate names the
  sender, and only if its token is not older than the newest one it has
  seen for that tree (a deposed owner never overwrites the new owner's
  copy: same rule as btrfs); it then runs ``rsync --server`` with the
  client's options checked against a short list, into a folder it chooses
  itself: whatever path the client names is ignored.

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

Consistency is the sender's business (:mod:`slaposha.resources.rsync`):
from a read-only btrfs snapshot when it can, else a live copy, which is not
crash-consistent (reference/replication.md section 1: 28 of 30 live copies
of a database mixed transactions), or only while the applications are
stopped. The mode is recorded with each copy.

One-off copies of a tree to a peer (the lead copies completed software
releases under /opt/slapgrid to the standbys)::

    copy_tree(source, peer, target, tls, host, timeout=600.0) -> Transfer

``source``: a folder here; ``peer``: Peer(name, address, port) of the
peer's receiver; ``target``: the folder to make there, below one of the
receiver's ``copy_roots`` (/opt/slapgrid by default); ``tls``: this host's
(ca, cert, key); ``host``: this host's name (as in its certificate). The
copy lands in a hidden staging folder beside ``target`` (kept after a cut:
the next try resumes from it) and replaces ``target`` only once complete
(an atomic exchange of the two folders). Raises ReplicationError.
"""

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple

from slaposha.inputs import cut, one_line
from slaposha.replication import (
    Peer, ReplicationError, StaleToken, human_bytes, locked_state, trim)
from slaposha.replication import wire
from slaposha.proc import boot_id, mount_holding, start_time
from slaposha.replication.diverged import DivergedCopies
from slaposha.units import human_seconds

__all__ = ['Tree', 'TreeReceiver', 'push', 'copy_tree', 'Transfer',
           'COPY_ROOTS', 'STORE_DIR', 'MODES', 'fstype', 'is_subvolume']

logger = logging.getLogger(__name__)

STORE_DIR = '.slaposha-rsync'
COPY_ROOTS = ('/opt/slapgrid',)
BUFFERS = ('a', 'b')
# How the sender made the copy consistent (or not), recorded with it.
MODES = ('snapshot', 'live', 'stopped')
ENV = 'SLAPOSHA_RSYNC'
CHUNK = 1 << 16
# Bytes a relay holds in one direction before it stops reading more.
HIGH_WATER = 1 << 20

# One push or copy: ``acked`` is when the peer confirmed it (wall clock).
Transfer = namedtuple('Transfer', 'peer tree created bytes files seconds'
                      ' acked mode')


_libc = None


def _libc_call(name, *args):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _syncfs(path):
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

def _tree_defaults():
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


class Tree(DivergedCopies):
    """A folder that follows its service, and its store on this host (the
    copies received, their records, the newest token seen)."""

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

    def __str__(self):
        return self.path

    def error(self, message, peer=None, incoming=False):
        return ReplicationError(self.path, message, peer, incoming)

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

    def _locked(self):
        """The store's state, locked against the receiver and the agent;
        written back (atomically) if changed."""
        return locked_state(os.path.join(self.store, 'state.json'),
                            _tree_defaults, self.error, mode=0o700)

    def state(self):
        with self._locked() as state:
            return dict(state)

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

    def _receiving(self):
        """A lock held while a transfer lands (a file descriptor to close),
        or None when another transfer holds it."""
        os.makedirs(self.store, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.store, '.receiving'),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fd

    def begin(self, token, sender):
        """Admit a transfer of epoch ``token``: StaleToken when a newer
        epoch was seen here, ReplicationError when the service runs here.
        Returns (staging folder, the complete copy's folder or None)."""
        with self._locked() as state:
            if token < state['token']:
                raise StaleToken(self.path, 'token %d is stale: token %d was'
                                 ' seen here' % (token, state['token']),
                                 sender, True)
            if _alive(state['active']):
                raise self.error('the service runs on this host (token %d):'
                                 ' it receives nothing'
                                 % state['active']['token'], sender, True)
            state['token'] = token
            complete, _ = self._newest(state)
            target = 'b' if complete == 'a' else 'a'
            # Before a byte lands: this copy is not complete any more.
            state['records'][target] = None
            if not os.path.isdir(self.buffer(target)):
                # On btrfs, a copy is a subvolume: promoted, the tree
                # stays one, and its new owner can send from snapshots.
                _make_folder(self.buffer(target),
                             fstype(self.store) == 'btrfs')
            return self.buffer(target), (self.buffer(complete)
                                         if complete else None)

    def commit(self, staging, record):
        """The transfer into ``staging`` finished: it becomes the newest
        complete copy, unless a newer owner was admitted meanwhile."""
        _syncfs(staging)
        name = os.path.basename(staging)
        with self._locked() as state:
            if record['token'] < state['token']:
                raise StaleToken(self.path, 'dropped: a newer owner (token'
                                 ' %d) was admitted during the transfer'
                                 % state['token'], record.get('host'), True)
            if _alive(state['active']):
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
            if token < state['token']:
                raise StaleToken(self.path, 'token %d is stale: a newer owner'
                                 ' (token %d) sent data here' % (
                                     token, state['token']))
            state['token'] = token
            done = self._promote(state, token)
            # Whatever the path held, it is this epoch's data from now on.
            state['live'] = dict(state['live'] or {}, token=token)
            pid = os.getpid()
            state['active'] = {'pid': pid, 'start': start_time(pid),
                               'boot': boot_id(), 'token': token}
            state['clean'] = False
            return done

    def deactivate(self, clean=False):
        """The service stopped here; ``clean``: after a last copy that
        every standby acknowledged (nothing here is missing there)."""
        with self._locked() as state:
            state['active'] = None
            state['clean'] = bool(clean)

    def active(self):
        state = self.state()
        return state['active']['token'] if _alive(state['active']) else None

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
        state['diverged'].append({'path': target, 'at': time.time(),
                                  'reason': reason, 'token': (
                                      state['live'] or {}).get('token')})
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
                'active': state['active']['token'] if _alive(
                    state['active']) else None,
                'peers': state['peers'],
                'diverged': [d for d in state['diverged']
                             if os.path.lexists(d['path'])]}


def _alive(active):
    return bool(active) and active.get('boot') == boot_id() and \
        start_time(active.get('pid', -1)) == active.get('start')


# -- the relay: rsync's pipes <-> frames on the TLS socket -----------------------

class _Relay(object):
    """Both directions between a TLS socket and a pair of pipes, in one
    thread (one SSL object must not be used by two threads at once) and
    without blocking (both rsyncs may write at once: a blocking relay could
    deadlock). What comes from ``src`` goes out as frames; frames from the
    socket go to ``dst``. An empty frame ends a direction."""

    def __init__(self, sock, src, dst, idle_timeout):
        self.sock = sock
        self.src, self.dst = src, dst
        self.idle_timeout = idle_timeout
        self.out = bytearray()       # framed, to the socket
        self.inbuf = bytearray()     # from the socket, not parsed yet
        self.to_dst = bytearray()
        self.src_open = True
        self.peer_ended = False      # its end frame came
        self.cut = False             # the socket closed before it
        self.sent = self.received = 0
        self._retry = 0              # length of an SSL write to repeat

    def run(self, until):
        """Relay until ``until(self)`` is true. Returns the bytes that came
        after the peer's end frame."""
        sock = self.sock
        sock.setblocking(False)
        for fd in (self.src, self.dst):
            if fd is not None:
                os.set_blocking(fd, False)
        last = time.monotonic()
        while not until(self):
            rlist, wlist = [], []
            if self.src_open and len(self.out) < HIGH_WATER:
                rlist.append(self.src)
            if not self.peer_ended and not self.cut and \
                    len(self.to_dst) < HIGH_WATER:
                rlist.append(sock)
            if self.out and not self.cut:
                wlist.append(sock)
            if self.to_dst and self.dst is not None:
                wlist.append(self.dst)
            if sock in rlist and sock.pending():
                ready_r, ready_w = [sock], []
            else:
                if not rlist and not wlist:
                    break
                ready_r, ready_w, _ = select.select(rlist, wlist, [], 1.0)
            moved = False
            if self.src in ready_r:
                moved |= self._read_src()
            if sock in ready_r:
                moved |= self._read_sock()
            if sock in ready_w:
                moved |= self._write_sock()
            if self.dst is not None and self.dst in ready_w:
                moved |= self._write_dst()
            now = time.monotonic()
            if moved:
                last = now
            elif now - last > self.idle_timeout:
                raise wire.WireError('nothing moved for %gs'
                                     % self.idle_timeout)
        rest = bytes(self.inbuf)
        self.inbuf = bytearray()
        return rest

    def _read_src(self):
        try:
            data = os.read(self.src, CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b''
        if data:
            self.out += wire.FRAME.pack(len(data)) + data
            self.sent += len(data)
        else:
            self.src_open = False
            self.out += wire.FRAME.pack(0)
        return True

    def _read_sock(self):
        try:
            data = self.sock.recv(CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError,
                BlockingIOError):
            return False
        except OSError:
            data = b''
        if not data:
            self.cut = True
            self._close_dst()
            return True
        self.inbuf += data
        while not self.peer_ended and len(self.inbuf) >= wire.FRAME.size:
            size, = wire.FRAME.unpack(self.inbuf[:wire.FRAME.size])
            if size > wire.MAX_FRAME:
                raise wire.WireError('frame of %d bytes is too large' % size)
            if size == 0:
                del self.inbuf[:wire.FRAME.size]
                self.peer_ended = True
                if not self.to_dst:
                    self._close_dst()
                break
            if len(self.inbuf) < wire.FRAME.size + size:
                break
            self.to_dst += self.inbuf[wire.FRAME.size:wire.FRAME.size + size]
            self.received += size
            del self.inbuf[:wire.FRAME.size + size]
        return True

    def _write_sock(self):
        size = self._retry or min(len(self.out), CHUNK)
        try:
            n = self.sock.send(bytes(self.out[:size]))
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError,
                BlockingIOError):
            self._retry = size   # OpenSSL wants the same write again
            return False
        except OSError:
            self.cut = True
            self.out = bytearray()
            self._close_dst()
            return True
        self._retry = 0
        del self.out[:n]
        return True

    def _write_dst(self):
        try:
            n = os.write(self.dst, self.to_dst[:CHUNK])
        except BlockingIOError:
            return False
        except OSError:   # the process is gone: what it did not read is lost
            self.to_dst = bytearray()
            self._close_dst()
            return True
        del self.to_dst[:n]
        if not self.to_dst and (self.peer_ended or self.cut):
            self._close_dst()
        return True

    def _close_dst(self):
        if self.dst is not None:
            try:
                os.close(self.dst)
            except OSError:
                pass
            self.dst = None


def _read_line(sock, rest=b'', limit=wire.MAX_LINE):
    """One JSON line read straight from the socket (no read-ahead: what
    follows it is the relay's), after ``rest`` (bytes already read)."""
    line = bytearray(rest)
    while not line.endswith(b'\n'):
        if len(line) > limit:
            raise wire.WireError('line too long')
        byte = sock.recv(1)
        if not byte:
            raise wire.WireError('connection closed before the answer')
        line += byte
    return wire.decode_line(bytes(line))


# -- rsync's server side, checked -----------------------------------------------

_SHORT = re.compile(r'^-[A-Za-z]+(\.[A-Za-z]*)?$')
_LONG = {'--delete', '--delete-after', '--delete-delay', '--delete-during',
         '--delete-before', '--stats', '--numeric-ids', '--hard-links',
         '--force', '--ignore-errors', '--partial', '--checksum', '--sparse',
         '--acls', '--xattrs', '--inplace', '--delay-updates'}
# --modify-window=N as the client passes it to the server.
_WINDOW = re.compile(r'^-@-?[0-9]+$')
_LONG_VALUE = {'--timeout', '--bwlimit', '--compress-level', '--max-delete',
               '--modify-window', '--block-size', '--checksum-choice',
               '--compress-choice'}


def server_command(args, target, copy_dest=None):
    """The ``rsync --server`` command to run for a client's ``args``
    (``rsync --server OPTIONS . PATH``), into ``target`` whatever PATH
    says. ValueError (one line) for anything but a push with known
    options."""
    if len(args) < 4 or args[:2] != ['rsync', '--server']:
        raise ValueError('not an rsync server command')
    try:
        dot = args.index('.', 2)
    except ValueError:
        raise ValueError('no "." in the rsync server command')
    options = []
    for arg in args[2:dot]:
        if arg == '--sender':
            raise ValueError('only pushes are served (--sender)')
        name = arg.split('=', 1)[0]
        if _SHORT.match(arg) or arg in _LONG or _WINDOW.match(arg) or (
                '=' in arg and name in _LONG_VALUE):
            options.append(arg)
        else:
            raise ValueError('rsync option %s is not served' % cut(arg))
    command = [_rsync_binary(), '--server'] + options
    if copy_dest:
        command.append('--copy-dest=%s' % copy_dest)
    return command + ['.', target.rstrip('/') + '/']


def _rsync_binary():
    return shutil.which('rsync') or 'rsync'


# -- every host's side ----------------------------------------------------------

class TreeReceiver(object):
    """The receiving side of rsync transfers, for the btrfs
    :class:`~slaposha.replication.btrfs.Receiver` to serve on the same port
    (``Receiver(..., handlers=TreeReceiver(trees).handlers)``): its TLS
    check of the client (a host of the cluster) comes first.

    ``trees``: the Tree objects (or paths) of the ``rsync`` resources of
    the services that may run here. ``copy_roots``: where one-off copies
    (:func:`copy_tree`) may land. ``idle_timeout``: a transfer with no byte
    moving for this long is dropped (a sender's host died).

    Requests (JSON lines): ``{"op": "rsync", "tree", "token", "sender",
    "created", "mode", "args"}`` and ``{"op": "copy", "target", "sender",
    "args"}``; the answer is a refusal, or a go-ahead followed by the relay
    and the final answer (``ok``, ``bytes``, ``seconds``, or ``error``).
    """

    def __init__(self, trees=(), copy_roots=COPY_ROOTS, idle_timeout=60.0):
        self.trees = {}
        for tree in trees:
            tree = tree if isinstance(tree, Tree) else Tree(tree)
            self.trees[tree.path] = tree
            # This host's receiver starts once per agent: what is in the
            # trash now, a crash left there.
            left = tree.sweep()
            if left:
                logger.info('%s: deleting %d folder(s) a crash left half'
                            ' deleted in %s', tree.path, left, tree.store)
        self.copy_roots = [os.path.normpath(r) for r in copy_roots]
        self.idle_timeout = idle_timeout

    @property
    def handlers(self):
        return {'rsync': self.receive, 'copy': self.copy}

    def receive(self, channel, request, who):
        """One transfer into a tree's store. Returns False: the connection
        carries nothing more."""
        sender = request['sender']
        tree = self.trees.get(request['tree'])
        label = one_line(request['tree'], 200)

        def refuse(message, stale=False):
            return wire.refuse(channel, who, str(ReplicationError(
                label, message, one_line(sender, 80), True)), stale=stale)

        if tree is None:
            return refuse('not a tree this host receives (%s)' % (
                ', '.join(self.trees) or 'none'))
        token = request['token']
        if sender != who:
            return refuse('its certificate is for %s, not %s' % (
                who, cut(sender)))
        if request['mode'] not in MODES:
            return refuse('unknown mode %s' % cut(request['mode']))
        try:
            busy = tree._receiving()
        except OSError as e:
            return refuse('cannot prepare: %s' % (e.strerror or e))
        if busy is None:
            return refuse('busy: another transfer into this tree is running')
        try:
            try:
                staging, complete = tree.begin(token, sender)
                command = server_command(request.get('args') or [], staging,
                                         complete)
            except StaleToken as e:
                return refuse(e.message, stale=True)
            except ReplicationError as e:
                return refuse(e.message)
            except ValueError as e:
                return refuse(str(e))
            except OSError as e:
                return refuse('cannot prepare: %s' % (e.strerror or e))
            return self._run(channel, command, sender, label, lambda size:
                             tree.commit(staging, {
                                 'token': token, 'host': sender,
                                 'created': request.get('created'),
                                 'received': time.time(), 'bytes': size,
                                 'mode': request['mode']}))
        finally:
            os.close(busy)

    def copy(self, channel, request, who):
        """One one-off copy into ``target`` (below a copy root)."""
        sender = request['sender']
        target = request['target']
        label = one_line(target, 200)

        def refuse(message):
            return wire.refuse(channel, who, str(ReplicationError(
                label, message, one_line(sender, 80), True)))

        if sender != who:
            return refuse('its certificate is for %s, not %s' % (
                who, cut(sender)))
        if '\0' in target or not os.path.isabs(target) or \
                os.path.normpath(target) != target or not any(
                    target.startswith(r.rstrip('/') + '/')
                    for r in self.copy_roots):
            return refuse('copies may land only below %s' % (
                ', '.join(self.copy_roots) or 'nowhere'))
        parent = os.path.dirname(target)
        if os.path.realpath(parent) != parent:
            return refuse('%s goes through a symbolic link' % parent)
        staging = os.path.join(parent, '.%s.slaposha-copy'
                               % os.path.basename(target))
        try:
            os.makedirs(staging, exist_ok=True)
            command = server_command(
                request.get('args') or [], staging,
                target if os.path.isdir(target) else None)
        except ValueError as e:
            return refuse(str(e))
        except OSError as e:
            return refuse('cannot prepare: %s' % (e.strerror or e))

        def done(size):
            _syncfs(staging)
            if os.path.isdir(target):
                exchange(staging, target)
                shutil.rmtree(staging, ignore_errors=True)
            else:
                os.rename(staging, target)
        return self._run(channel, command, sender, label, done)

    def _run(self, channel, command, sender, label, finish):
        """Run rsync --server relayed to the channel; ``finish(bytes)``
        after it exited 0. Sends the final answer."""
        channel.send_json({'ok': True, 'go': True})
        started = time.monotonic()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
            relay = _Relay(channel.sock, proc.stdout.fileno(),
                           os.dup(proc.stdin.fileno()), self.idle_timeout)
            proc.stdin.close()
            failure = None
            try:
                # Done when rsync closed its output: it has said all.
                relay.run(lambda r: not r.src_open and not r.out)
            except (OSError, wire.WireError) as e:
                failure = 'relay: %s' % (getattr(e, 'strerror', None) or e)
            finally:
                relay._close_dst()
                proc.stdout.close()
            if failure is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            err.seek(0)
            stderr = trim(err.read().decode(errors='replace'))
        seconds = time.monotonic() - started
        answer = {'ok': False}
        if failure is None and code == 0:
            try:
                finish(relay.received)
            except ReplicationError as e:
                failure = e.message
            except OSError as e:
                failure = 'cannot keep the copy: %s' % (e.strerror or e)
        elif failure is None:
            failure = 'rsync exit %d%s%s' % (code, ': ' if stderr else '',
                                             stderr)
        if failure is None:
            answer = {'ok': True, 'bytes': relay.received,
                      'seconds': seconds}
            logger.info('%s <- %s: received %s in %.2f s', label, sender,
                        human_bytes(relay.received), seconds)
        else:
            error = ReplicationError(label, 'transfer failed, not kept: %s'
                                     % failure, sender, True)
            logger.warning('%s', error)
            answer['error'] = str(error)
        try:
            channel.sock.setblocking(True)
            channel.sock.settimeout(10)
            channel.send_json(answer)
        except OSError:
            pass
        return False


# -- the sending side -------------------------------------------------------------

def _helper_command():
    # rsync splits -e on spaces: the interpreter's path has none in practice.
    return '%s -m slaposha.replication.rsync' % sys.executable


def _run_rsync(source, peer, request, tls, timeout, options=(), abort=None,
               on_start=None):
    """rsync ``source`` to ``peer`` with ``request`` as the channel's
    request. Returns (final answer, seconds, stats dict); raises
    ReplicationError (StaleToken when refused for its token)."""
    label = request.get('tree') or request.get('target')
    peer = peer if isinstance(peer, Peer) else Peer(*peer)
    if not os.path.isdir(source):
        raise ReplicationError(label, 'cannot send %s: not a folder'
                               % source, peer.name)
    with tempfile.TemporaryDirectory(prefix='slaposha-rsync-') as folder:
        result = os.path.join(folder, 'answer.json')
        # The helper runs with this process's sys.path: under a buildout
        # script (a software release's bin/slaposha) the interpreter alone
        # would not find slaposha.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in sys.path if p))
        env[ENV] = json.dumps({
            'address': peer.address, 'port': peer.port, 'name': peer.name,
            'tls': list(tls), 'request': request, 'result': result,
            'timeout': timeout})
        # --modify-window=-1: mtimes compared to the nanosecond; rsync's
        # default (whole seconds) skips a file rewritten with the same size
        # within the second of the last copy, and the copy would keep the
        # old content for good.
        command = [_rsync_binary(), '-aH', '--numeric-ids', '--delete',
                   '--modify-window=-1', '--stats',
                   '--timeout=%d' % max(1, int(timeout))] + \
            list(options) + ['-e', _helper_command(),
                             source.rstrip('/') + '/', '%s:/' % peer.name]
        started = time.monotonic()
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=err, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True,
                                        universal_newlines=True)
            except OSError as e:
                raise ReplicationError(label, 'cannot run rsync: %s' % (
                    e.strerror or e), peer.name)
            if on_start is not None:
                on_start(proc)
            try:
                out, _ = proc.communicate()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            err.seek(0)
            stderr = trim(err.read().decode(errors='replace'))
        seconds = time.monotonic() - started
        try:
            with open(result) as f:
                answer = json.load(f)
        except (OSError, ValueError):
            answer = None
    if abort is not None and abort.is_set():
        raise ReplicationError(label, 'aborted', peer.name)
    if answer is not None and not answer.get('ok'):
        cls = StaleToken if answer.get('stale') else ReplicationError
        raise cls(label, 'refused: %s' % answer.get('error'), peer.name)
    if proc.returncode or answer is None:
        raise ReplicationError(label, 'rsync exit %d: %s' % (
            proc.returncode, stderr or 'no answer from the peer'), peer.name)
    return answer, seconds, _stats(out)


def _stats(out):
    stats = {}
    for line in (out or '').splitlines():
        key, sep, value = line.partition(':')
        if sep:
            digits = value.strip().split(' ')[0].replace(',', '')
            if digits.isdigit():
                stats[key.strip()] = int(digits)
    return stats


def push(tree, peer, tls, host, token, source=None, created=None,
         mode='live', timeout=60.0, abort=None, on_start=None):
    """Copy ``source`` (default: the tree's path) to the tree's store on
    ``peer``, as the owner ``host`` of epoch ``token``. ``created``: when
    the data was taken (wall clock; default now); ``mode``: one of MODES.
    Returns a Transfer; raises ReplicationError (StaleToken when the peer
    has seen a newer epoch: this host is no longer the owner)."""
    tree = tree if isinstance(tree, Tree) else Tree(tree)
    peer = peer if isinstance(peer, Peer) else Peer(*peer)
    created = time.time() if created is None else created
    request = {'op': 'rsync', 'tree': tree.path, 'token': int(token),
               'sender': host, 'created': created, 'mode': mode}
    answer, seconds, stats = _run_rsync(source or tree.path, peer, request,
                                        tls, timeout, abort=abort,
                                        on_start=on_start)
    return Transfer(peer.name, tree.path, created,
                    stats.get('Total bytes sent', answer.get('bytes', 0)),
                    stats.get('Number of regular files transferred'),
                    seconds, time.time(), mode)


def copy_tree(source, peer, target, tls, host, timeout=600.0):
    """Copy the folder ``source`` to ``target`` on ``peer`` (see the module
    docstring). Returns a Transfer; raises ReplicationError."""
    peer = peer if isinstance(peer, Peer) else Peer(*peer)
    request = {'op': 'copy', 'target': os.path.normpath(target),
               'sender': host}
    answer, seconds, stats = _run_rsync(source, peer, request, tls, timeout)
    return Transfer(peer.name, target, None,
                    stats.get('Total bytes sent', answer.get('bytes', 0)),
                    stats.get('Number of regular files transferred'),
                    seconds, time.time(), None)


# -- the helper rsync runs as its remote shell ---------------------------------

def helper(argv):
    """``python -m slaposha.replication.rsync HOST rsync --server ...``:
    what rsync runs instead of ssh. The channel's address, certificates
    and request come in the environment (``SLAPOSHA_RSYNC``)."""
    try:
        spec = json.loads(os.environ[ENV])
    except (KeyError, ValueError):
        sys.stderr.write('slaposha rsync helper: %s is missing: run by'
                         ' slaposha only\n' % ENV)
        return 2

    def say(answer):
        with open(spec['result'], 'w') as f:
            json.dump(answer, f)

    timeout = float(spec.get('timeout') or 60)
    tls = tuple(spec['tls'])
    try:
        channel = wire.connect(spec['address'], spec['port'], spec['name'],
                               tls, min(timeout, 10.0))
        wire.check_host(channel.sock, wire.revocations(tls), [spec['name']])
        channel.settimeout(timeout)
        channel.send_json(dict(spec['request'], args=argv[1:]))
        answer = _read_line(channel.sock)
    except (OSError, wire.WireError) as e:
        message = 'cannot reach %s:%s: %s' % (spec['address'], spec['port'],
                                              getattr(e, 'strerror', None)
                                              or e)
        say({'ok': False, 'error': message})
        sys.stderr.write(message + '\n')
        return 12
    if not answer.get('ok') or not answer.get('go'):
        say(answer)
        sys.stderr.write('%s\n' % answer.get('error'))
        return 12
    relay = _Relay(channel.sock, 0, 1, timeout + 10)
    try:
        # As ssh: done when the other side ended (rsync --server exited).
        rest = relay.run(lambda r: (r.peer_ended or r.cut) and
                         not r.to_dst)
        relay._close_dst()
        if relay.cut:
            raise wire.WireError('connection closed before the end')
        channel.sock.settimeout(timeout)
        say(_read_line(channel.sock, rest))
    except (OSError, wire.WireError) as e:
        message = 'connection to %s lost: %s' % (
            spec['name'], getattr(e, 'strerror', None) or e)
        say({'ok': False, 'error': message})
        sys.stderr.write(message + '\n')
        return 12
    finally:
        channel.close()
    return 0


if __name__ == '__main__':
    sys.exit(helper(sys.argv[1:]))
