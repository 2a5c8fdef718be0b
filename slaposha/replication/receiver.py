"""Every host's side of replication: the TLS receiver of both engines.

- :class:`Receiver`: a TLS server that answers which snapshots of a btrfs
  volume it has, and pipes a stream into ``btrfs receive``. A snapshot is
  complete only when the whole stream came and ``btrfs receive`` finished
  it (it makes it read-only last); anything else is deleted at once.
- :class:`TreeReceiver`: the rsync engine's requests, served by the
  :class:`Receiver` on the same port after its TLS check. It admits a
  request only from a host of the cluster whose certificate names the
  sender, and only if its token is not older than the newest one it has
  seen for that tree (a deposed owner never overwrites the new owner's
  copy: same rule as btrfs); it then runs ``rsync --server`` with the
  client's options checked against a short list, into a folder it chooses
  itself: whatever path the client names is ignored.
"""

import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time

from slaposha.replication import (
    ReplicationError, StaleToken, human_bytes, trim)
from slaposha.inputs import Clients, cut, one_line
from slaposha.replication import wire
from slaposha.replication.relay import Relay, rsync_binary
from slaposha.replication.tree import MODES, Tree, exchange
from slaposha.replication.tree import syncfs as tree_syncfs
from slaposha.replication.volume import (
    NAME_RE, Volume, is_subvolume, stderr_text, syncfs, widen)

__all__ = ['Receiver', 'TreeReceiver', 'DEFAULT_PORT', 'COPY_ROOTS',
           'server_command']

DEFAULT_PORT = 1216
COPY_ROOTS = ('/opt/slapgrid',)

# The log names the engine (as before its modules were split).
logger = logging.getLogger('slaposha.replication.btrfs')
rsync_logger = logging.getLogger('slaposha.replication.rsync')


def received(callback, path):
    """A complete copy of ``path`` landed here: tell ``callback`` (the
    agent: a standby waiting for its first copy is eligible now). Never
    fails the receive."""
    if callback is None:
        return
    try:
        callback(path)
    except Exception:
        logger.exception('%s: telling the agent of the copy failed', path)


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
                 max_peer_connections=32, on_received=None):
        self.address = address
        # Told the path of each volume a complete copy landed in.
        self.on_received = on_received
        self.port = port
        self.tls = tls
        self.hosts = hosts
        # Other engines' requests on the same port, after the same TLS
        # check: {op: f(channel, request, sender) -> connection goes on}
        # (rsync: TreeReceiver.handlers).
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
                volume._may_receive(state, token, sender)
                if volume.get(name) is not None:
                    channel.send_json({'ok': True, 'have': True})
                    return True
                parent = volume.get(parent_name) if parent_name else None
                if parent_name and parent is None:
                    return refuse('parent snapshot %s is not here'
                                  % parent_name)
                state['token'] = token
                notes = volume._follow(state, parent, sender, token)
        except StaleToken as e:
            return refuse(e.message, stale=True)
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
            syncfs(volume.snapdir)
        except (ReplicationError, OSError) as e:
            if not isinstance(e, ReplicationError):
                e = volume.error('cannot keep %s: %s' % (
                    name, e.strerror or e), sender, True)
            try:
                if is_subvolume(path):
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
        received(self.on_received, volume.path)
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
            widen(proc.stdin)
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
                                           % (name, stderr_text(err)), sender,
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
                        name, stderr_text(err) or 'exit %d' % code), sender,
                        True)
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


# -- rsync's server side, checked ---------------------------------------------

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
    command = [rsync_binary(), '--server'] + options
    if copy_dest:
        command.append('--copy-dest=%s' % copy_dest)
    return command + ['.', target.rstrip('/') + '/']


# -- the rsync engine's requests ----------------------------------------------

class TreeReceiver(object):
    """The receiving side of rsync transfers, for the btrfs
    :class:`Receiver` to serve on the same port
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

    def __init__(self, trees=(), copy_roots=COPY_ROOTS, idle_timeout=60.0,
                 on_received=None):
        self.on_received = on_received
        self.trees = {}
        for tree in trees:
            tree = tree if isinstance(tree, Tree) else Tree(tree)
            self.trees[tree.path] = tree
            # This host's receiver starts once per agent: what is in the
            # trash now, a crash left there.
            left = tree.sweep()
            if left:
                rsync_logger.info('%s: deleting %d folder(s) a crash left'
                                  ' half deleted in %s', tree.path, left,
                                  tree.store)
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
            tree_syncfs(staging)
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
            relay = Relay(channel.sock, proc.stdout.fileno(),
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
            rsync_logger.info('%s <- %s: received %s in %.2f s', label,
                              sender, human_bytes(relay.received), seconds)
            received(self.on_received, label)
        else:
            error = ReplicationError(label, 'transfer failed, not kept: %s'
                                     % failure, sender, True)
            rsync_logger.warning('%s', error)
            answer['error'] = str(error)
        try:
            channel.sock.setblocking(True)
            channel.sock.settimeout(10)
            channel.send_json(answer)
        except OSError:
            pass
        return False
