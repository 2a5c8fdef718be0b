"""The owner's side of btrfs replication: its snapshots sent to the standbys.

:class:`Sender` (on the owner): ``send()`` sends a read-only snapshot to
one standby incrementally from the newest snapshot that standby confirms
it has (a full send when none); one ``cycle()`` takes a snapshot, sends
it to every standby at once, then prunes; ``progress`` tells how a
transfer goes. The driver runs it without pause with
:class:`slaposha.replication.pacer.Pacer` (each standby at its own pace).
The standbys' :class:`slaposha.replication.receiver.Receiver` takes the
streams; :mod:`slaposha.replication.volume` says what a snapshot is.
"""

import logging
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections import namedtuple

from slaposha.replication import (
    Peer, Progress, ReplicationError, StaleToken, trim)
from slaposha.replication import wire
from slaposha.replication.volume import (
    CHUNK, Changes, Volume, stderr_text, widen)

__all__ = ['Sender', 'Transfer', 'Cycle']

# The log names the engine (as before its modules were split).
logger = logging.getLogger('slaposha.replication.btrfs')

# One send to one peer: ``skipped`` when the peer had the snapshot already;
# ``acked``: when the peer confirmed it has it (wall clock); ``changed``:
# whether the stream changed anything (see Changes; None when skipped).
Transfer = namedtuple('Transfer', 'peer snapshot parent bytes seconds'
                      ' skipped acked changed')

# One replication cycle: the snapshot taken, when (wall clock) and how long,
# a Transfer per peer that got it, the ReplicationError of each that did
# not (under None: the pruning's).
Cycle = namedtuple('Cycle', 'snapshot started seconds results errors')


def dump_commands(stream):
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
                commands = dump_commands(send.stdout)
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
        changes = Changes()
        with self._lock:
            self.sending[peer.name] = progress
        with tempfile.TemporaryFile() as err:
            args = ['btrfs', 'send', '-q'] + (
                ['-p', parent.path] if parent else []) + [snap.path]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                                    stderr=err, stdin=subprocess.DEVNULL)
            widen(proc.stdout)
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
                    snap.name, stderr_text(err) or 'exit %d' % code), peer)
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
