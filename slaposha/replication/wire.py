"""The wire between an owner and its standbys: TLS, JSON lines, frames.

Both sides prove themselves with a certificate of the cluster CA (the files
``ca.crt``, ``<host>.crt``, ``<host>.key`` of ``ssl_dir``, see
:mod:`slaposha.pki`): a receiver writes into a host's file system as root,
so it talks only to hosts of the cluster (a certificate of the ``host``
role, not an operator's, not revoked in ``crl.pem`` beside ``ca.crt``), and
a sender checks it reached the host it meant.

A request is one JSON line; the answer is one JSON line, ``{"ok": true,
...}`` or ``{"ok": false, "error": "<one line>"}``. A stream follows its
header, once the receiver said go, as frames (a 4-byte big-endian length,
then that many bytes) and ends with an empty frame: a connection that closes
before the empty frame is a cut stream, never a complete one, whatever the
bytes that came looked like.
"""

import json
import os
import socket
import ssl
import struct

from slaposha import pki

__all__ = ['server_context', 'client_context', 'Channel', 'connect',
           'WireError', 'revocations', 'check_host']

MAX_LINE = 1 << 16
FRAME = struct.Struct('>I')
MAX_FRAME = 1 << 24


class WireError(Exception):
    """The other side broke the protocol or went away, as one line."""


def _context(purpose, tls):
    ca, cert, key = tls
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(tls):
    """A receiver's context: ``tls`` is (ca, cert, key) files; clients must
    show a certificate of the same CA."""
    return _context(ssl.PROTOCOL_TLS_SERVER, tls)


def client_context(tls):
    context = _context(ssl.PROTOCOL_TLS_CLIENT, tls)
    context.check_hostname = True
    return context


def revocations(tls):
    """The cluster's revocation list (``crl.pem`` beside ``ca.crt``, read
    again when it changes; none there: nothing is revoked)."""
    ca = tls[0]
    try:
        ca_cert = pki.load_cert(ca)
    except pki.PkiError as e:
        raise WireError(str(e))
    return pki.Revocations(os.path.join(os.path.dirname(ca), 'crl.pem'),
                           ca_cert)


def check_host(sock, revoked, hosts=None):
    """The name of the cluster host at the other end of ``sock``; WireError
    unless its certificate is a host's, is not revoked (``revoked``: a
    pki.Revocations) and, with ``hosts``, names one of them."""
    cert = sock.getpeercert() or {}
    role, name = pki.role_from_peercert(cert)
    try:
        serial = int(cert.get('serialNumber', ''), 16)
    except ValueError:
        raise WireError('the certificate of %s has no serial number' % name)
    try:
        if revoked.is_revoked(serial):
            raise WireError('the certificate of %s (serial %s) is revoked'
                            % (name, pki.serial_text(serial)))
    except pki.PkiError as e:
        raise WireError('the revocation list is unusable: %s' % e)
    if role != pki.HOST_ROLE:
        raise WireError('the certificate of %s is not a host\'s (role %s)'
                        % (name, role or 'none'))
    if hosts is not None and name not in hosts:
        raise WireError('%s is not a host of this cluster' % name)
    return name


class Channel(object):
    """JSON lines and frames over one (TLS) socket."""

    def __init__(self, sock):
        self.sock = sock
        self.rfile = sock.makefile('rb')

    def close(self):
        for thing in (self.rfile, self.sock):
            try:
                thing.close()
            except OSError:
                pass

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def send_json(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b'\n')

    def recv_json(self):
        """The next JSON line; None when the other side closed cleanly
        before sending one."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_LINE or not line.endswith(b'\n'):
            raise WireError('line too long or cut')
        try:
            obj = json.loads(line.decode())
        except ValueError:
            raise WireError('not JSON: %r' % line[:80])
        if not isinstance(obj, dict):
            raise WireError('expected a JSON object')
        return obj

    def send_frame(self, data):
        self.sock.sendall(FRAME.pack(len(data)) + data)

    def end_frames(self):
        self.sock.sendall(FRAME.pack(0))

    def recv_frame(self):
        """The next frame's bytes; b'' for the end frame. WireError when
        the connection closes in between (a cut stream)."""
        head = self.rfile.read(FRAME.size)
        if len(head) < FRAME.size:
            raise WireError('connection closed before the end of the stream')
        size, = FRAME.unpack(head)
        if size > MAX_FRAME:
            raise WireError('frame of %d bytes is too large' % size)
        if size == 0:
            return b''
        data = self.rfile.read(size)
        if len(data) < size:
            raise WireError('connection closed before the end of the stream')
        return data


def connect(address, port, name, tls, timeout):
    """A Channel to the receiver of host ``name`` at ``address:port``; its
    certificate must be for ``name``. Raises OSError (ssl.SSLError is one)
    when it cannot."""
    raw = socket.create_connection((address, port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = client_context(tls).wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise
    return Channel(sock)
