"""The wire between an owner and its standbys: TLS, JSON lines, frames.

Both sides prove themselves with a certificate of the cluster CA (the files
``ca.crt``, ``<host>.crt``, ``<host>.key`` of ``ssl_dir``, see
:mod:`slaposha.pki`): a receiver writes into a host's file system as root,
so it talks only to hosts of the cluster (a certificate of the ``host``
role, not an operator's, not revoked in ``crl.pem`` beside ``ca.crt``), and
a sender checks it reached the host it meant.

A request is one JSON line (at most MAX_LINE bytes, nested at most
:data:`slaposha.inputs.MAX_DEPTH` deep, its fields as :data:`REQUESTS`
says); the answer is one JSON line, ``{"ok": true, ...}`` or ``{"ok":
false, "error": "<one line>"}``. A stream follows its header, once the
receiver said go, as frames (a 4-byte big-endian length, then that many
bytes) and ends with an empty frame: a connection that closes before the
empty frame is a cut stream, never a complete one, whatever the bytes that
came looked like.
"""

import io
import json
import logging
import os
import socket
import ssl
import struct

from slaposha import pki
from slaposha.inputs import (
    NUMBER, DeadlineReader, InputError, check_fields, cut, loads, one_line)

__all__ = ['server_context', 'client_context', 'Channel', 'connect',
           'WireError', 'revocations', 'check_host', 'decode_line',
           'check_request', 'check_answer', 'refuse', 'REQUESTS', 'ANSWERS']

logger = logging.getLogger(__name__)

MAX_LINE = 1 << 16
FRAME = struct.Struct('>I')
MAX_FRAME = 1 << 24

# The fields of each request (inputs.check_fields: JSON true is no token).
# A request whose fields are anything else is refused before an engine
# sees it; an engine's new request declares its fields here (one that does
# not is served unchecked).
REQUESTS = {
    'list': {'volume': str},
    'receive': {'volume': str, 'snapshot': str, 'parent': (str, None),
                'token': int, 'sender': str, 'created': NUMBER + (None,),
                'size': (int, None), 'keep': (int, None),
                'exported': ([str], None)},
    'rsync': {'tree': str, 'token': int, 'sender': str,
              'created': NUMBER + (None,), 'mode': str, 'args': [str]},
    'copy': {'target': str, 'sender': str, 'args': [str]},
}
# What a sender reads of the answers, checked alike.
ANSWERS = {
    'list': {'token': int, 'active': (int, None), 'snapshots': [str]},
}


class WireError(Exception):
    """The other side broke the protocol or went away, as one line."""


def decode_line(line):
    """The JSON object of one request or answer line (bytes ending with a
    newline, at most MAX_LINE bytes); WireError says why not."""
    if len(line) > MAX_LINE or not line.endswith(b'\n'):
        raise WireError('line too long or cut (%d bytes)' % len(line))
    try:
        return loads(line, MAX_LINE, 'line')
    except InputError as e:
        raise WireError(str(e))


def check_request(request, ops):
    """The op of ``request``; WireError, as one line, unless it is one of
    ``ops`` with each field of the type REQUESTS says."""
    op = request.get('op')
    if not isinstance(op, str) or op not in ops:
        raise WireError('unknown request %s (requests: %s)' % (
            cut(op), ', '.join(sorted(ops))))
    try:
        check_fields(request, REQUESTS.get(op, {}), op)
    except InputError as e:
        raise WireError(str(e))
    return op


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


def check_answer(answer, op):
    """``answer`` (an ok answer to ``op``); WireError unless its fields
    are as ANSWERS says."""
    try:
        return check_fields(answer, ANSWERS.get(op, {}), '%s answer' % op)
    except InputError as e:
        raise WireError(str(e))


def refuse(channel, peer, message, **fields):
    """Say no to ``peer`` (who it is, as the log names it): one line in
    the log, and the answer ``{"ok": false, "error": message}`` with
    ``fields``. Returns False (the connection carries nothing more)."""
    message = one_line(message, 500)
    logger.warning('receiver: refused %s: %s', peer, message)
    try:
        channel.send_json(dict(fields, ok=False, error=message))
    except OSError:
        pass  # gone: the log line is all there is to say
    return False


class Channel(object):
    """JSON lines and frames over one (TLS) socket."""

    def __init__(self, sock):
        self.sock = sock
        self._reader = DeadlineReader(sock, sock.gettimeout())
        self.rfile = io.BufferedReader(self._reader)

    def close(self):
        for thing in (self.rfile, self.sock):
            try:
                thing.close()
            except OSError:
                pass

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)
        self._reader.timeout = seconds

    def send_json(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b'\n')

    def recv_json(self, within=None):
        """The next JSON line; None when the other side closed cleanly
        before sending one. ``within``: seconds the whole line may take
        (else each read waits the socket's timeout: a peer that trickles
        keeps it)."""
        self._reader.within(within)
        try:
            line = self.rfile.readline(MAX_LINE + 1)
        finally:
            self._reader.within(None)
        if not line:
            return None
        return decode_line(line)

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
