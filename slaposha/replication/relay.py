"""rsync's byte stream over the cluster's channel, as ssh would carry it.

The owner runs ``rsync -e HELPER`` where HELPER is this module (``python -m
slaposha.replication.relay``, see :func:`helper`): it opens the channel to
the peer's receiver, sends one JSON request (the fencing token, the sender,
the tree, rsync's server arguments) and, once admitted, relays rsync's
stdin/stdout as frames (:class:`Relay`). The peer's
:class:`slaposha.replication.receiver.TreeReceiver` relays them to and from
``rsync --server`` the same way.
"""

import json
import os
import select
import shutil
import ssl
import sys
import time

from slaposha.replication import wire

__all__ = ['Relay', 'read_line', 'helper', 'helper_command', 'rsync_binary',
           'ENV']

ENV = 'SLAPOSHA_RSYNC'
CHUNK = 1 << 16
# Bytes a relay holds in one direction before it stops reading more.
HIGH_WATER = 1 << 20


# -- the relay: rsync's pipes <-> frames on the TLS socket -------------------

class Relay(object):
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


def read_line(sock, rest=b'', limit=wire.MAX_LINE):
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


def rsync_binary():
    return shutil.which('rsync') or 'rsync'


def helper_command():
    # rsync splits -e on spaces: the interpreter's path has none in practice.
    return '%s -m slaposha.replication.relay' % sys.executable


# -- the helper rsync runs as its remote shell -------------------------------

def helper(argv):
    """``python -m slaposha.replication.relay HOST rsync --server ...``:
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
        answer = read_line(channel.sock)
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
    relay = Relay(channel.sock, 0, 1, timeout + 10)
    try:
        # As ssh: done when the other side ended (rsync --server exited).
        rest = relay.run(lambda r: (r.peer_ended or r.cut) and
                         not r.to_dst)
        relay._close_dst()
        if relay.cut:
            raise wire.WireError('connection closed before the end')
        channel.sock.settimeout(timeout)
        say(read_line(channel.sock, rest))
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
