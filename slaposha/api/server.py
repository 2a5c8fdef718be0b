"""The HTTP layer under the agent's HTTPS API, its health port and its unix
socket: one server and one request handler, with the limits every client
meets (``[api]`` keys, :mod:`slaposha.config`):

- at most ``max_connections`` connections at once, and at most
  ``max_client_connections`` of one client: counted by address until the
  server knows who the client is (its certificate, on the HTTPS API), then
  by who it is. A connection beyond either limit is closed at once, or
  answered 429 once the client is known: one client, however many
  connections it opens, never takes every slot from the others;
- the whole request (TLS handshake, request line, headers, body) within
  ``request_timeout`` of the connection: a client that trickles a byte now
  and then is answered 408 at that deadline, however it trickles (a
  socket timeout alone starts again at each byte);
- one request per connection, answered HTTP/1.0 with a status line, and
  HTTP framing that is not HTTP/1.x answered 4xx with one line: an empty
  request line, one without a version (HTTP/0.9), Content-Length headers
  that disagree, a Transfer-Encoding (bodies come with a Content-Length), a
  body over its limit;
- what the client sent reaches the log printable and cut
  (:func:`slaposha.inputs.cut`).
"""

import io
import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, HTTPServer

from slaposha.api import ApiError
from slaposha.inputs import Clients, DeadlineReader, cut, one_line

__all__ = ['BoundedServer', 'RequestHandler', 'Limits', 'limits_of']

MAX_LINE = 65536               # the request line, as http.server reads it
DRAIN_LIMIT = 4 * 1024 * 1024  # read (and drop) an oversized body up to this

Limits = namedtuple('Limits', 'max_connections max_client_connections'
                    ' request_timeout')


def limits_of(api):
    """The Limits of an ``[api]`` section."""
    return Limits(api.max_connections, api.max_client_connections,
                  api.request_timeout)


class Slot(object):
    """One connection being served: the client it counts for (its address,
    then who it is) and the deadline of its request."""

    def __init__(self, clients, key, timeout):
        self.clients = clients
        self.key = key
        self.deadline = time.monotonic() + timeout

    def remaining(self):
        return self.deadline - time.monotonic()

    def become(self, key):
        """Count the connection as ``key``'s from now on; False (and still
        counted as before) when ``key`` already holds its limit."""
        if key == self.key:
            return True
        if not self.clients.take(key):
            return False
        self.clients.give(self.key)
        self.key = key
        return True

    def release(self):
        self.clients.give(self.key)


class BoundedServer(HTTPServer):
    """A thread per connection within ``limits`` (:class:`Limits`), on
    IPv4 or IPv6 as its address is, or on a unix socket when the address
    is a path; never blocking its shutdown. ``name`` starts its log
    lines."""

    request_queue_size = 64
    name = 'http'

    def __init__(self, server_address, handler, limits):
        if isinstance(server_address, str):
            self.address_family = socket.AF_UNIX
        elif ':' in server_address[0]:
            self.address_family = socket.AF_INET6
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.clients = Clients(limits.max_client_connections)
        super().__init__(server_address, handler)

    def server_bind(self):
        # Not HTTPServer.server_bind: it looks the address up in the DNS.
        socketserver.TCPServer.server_bind(self)
        if self.address_family != socket.AF_UNIX:
            self.server_name, self.server_port = self.server_address[:2]

    @staticmethod
    def client_name(client_address):
        if isinstance(client_address, tuple) and client_address:
            return client_address[0]
        return 'local'

    def refused(self, client_address, why):
        """A connection closed at once, for ``why``."""
        logging.getLogger(type(self).__module__).warning(
            '%s: %s refused: %s', self.name,
            self.client_name(client_address), why)

    def process_request(self, request, client_address):
        client = self.client_name(client_address)
        if not self.slots.acquire(blocking=False):
            self.refused(client_address, '%d connections open (the limit)'
                         % self.limits.max_connections)
            self.shutdown_request(request)
            return
        key = ('address', client)
        if not self.clients.take(key):
            self.slots.release()
            self.refused(client_address, 'it has %d connections open (the'
                         ' limit of one client)'
                         % self.limits.max_client_connections)
            self.shutdown_request(request)
            return
        slot = Slot(self.clients, key, self.limits.request_timeout)
        try:
            threading.Thread(target=self._serve, daemon=True, args=(
                request, client_address, slot)).start()
        except BaseException:
            slot.release()
            self.slots.release()
            self.shutdown_request(request)
            raise

    def _serve(self, request, client_address, slot):
        try:
            self.serve_connection(request, client_address, slot)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()
            self.slots.release()

    def serve_connection(self, request, client_address, slot):
        """Serve one connection (the HTTPS API first makes it TLS)."""
        self.RequestHandlerClass(request, client_address, self, slot)

    def handle_error(self, request, client_address):
        logging.getLogger(type(self).__module__).exception(
            '%s: %s: connection failed', self.name,
            self.client_name(client_address))


class RequestHandler(BaseHTTPRequestHandler):
    """One request per connection, read within its slot's deadline (none
    without a slot) and answered with a status line. Subclasses define
    ``do_<METHOD>`` (any other method is answered 405) and
    :meth:`answer_error`; ``refusal`` (status, line): answer that at once,
    without reading the request."""

    protocol_version = 'HTTP/1.0'
    sys_version = ''
    timeout = None      # the slot's deadline bounds the reads

    def __init__(self, request, client_address, server, slot=None,
                 refusal=None):
        self.slot = slot
        self.refusal = refusal
        self.answered = False
        super().__init__(request, client_address, server)

    @property
    def logger(self):
        """The server's: its module names the log lines of its requests."""
        return logging.getLogger(type(self.server).__module__)

    def setup(self):
        super().setup()
        if self.slot is not None:
            write_timeout = self.server.limits.request_timeout
            self.connection.settimeout(write_timeout)
            self.rfile.close()   # the socket's own reader: reads wait alike
            self.rfile = io.BufferedReader(DeadlineReader(
                self.connection, write_timeout, self.slot.deadline))

    def address_string(self):
        return self.server.client_name(self.client_address)

    def log_message(self, format, *args):
        self.logger.debug('%s: %s: %s', self.server.name,
                          self.address_string(), one_line(format % args))

    def log_request(self, code='-', size='-'):
        pass  # the subclasses log each request with what they know

    def send_response_only(self, code, message=None):
        self.answered = True
        super().send_response_only(code, message)

    def handle(self):
        self.close_connection = True
        if self.refusal is not None:
            self.command, self.requestline = None, ''
            self.request_version = 'HTTP/1.0'
            self.answer_error(*self.refusal)
            return
        self.handle_one_request()

    def handle_one_request(self):
        self.close_connection = True    # one request per connection
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if not self.raw_requestline:
                return  # closed without a word: nobody to answer
            if len(self.raw_requestline) > MAX_LINE:
                self.command, self.requestline = None, ''
                self.send_error(414, 'request line longer than %d bytes'
                                % MAX_LINE)
                return
            if not self.parse_request():
                return
            method = getattr(self, 'do_' + self.command, None)
            if method is None:
                self.send_error(405, '%s is not served' % cut(self.command))
                return
            try:
                method()
            except ApiError as e:
                self.refuse(e.status, str(e))
            self.wfile.flush()
        except socket.timeout:
            self._late()
        except OSError as e:   # the client left
            self.log_message('connection lost: %s', e)

    def _late(self):
        if self.answered:   # the client does not read its answer
            self.log_message('answer not taken within %g s',
                             self.server.limits.request_timeout)
            return
        self.logger.info('%s: %s: no complete request within %g s: cut',
                         self.server.name, self.address_string(),
                         self.server.limits.request_timeout)
        self.command = None
        self.request_version = 'HTTP/1.0'
        try:
            self.answer_error(408, 'the request did not come whole within'
                              ' %g s' % self.server.limits.request_timeout)
            self.wfile.flush()
        except OSError:
            pass

    def parse_request(self):
        words = self.raw_requestline.split()
        if len(words) in (0, 2):
            # An empty line (this server keeps no connection open for a
            # next request, where RFC 9112 lets one pass), or HTTP/0.9,
            # whose answers have no status line.
            self.command = None
            self.requestline = one_line(self.raw_requestline.decode(
                'iso-8859-1'))
            self.send_error(400, 'a request line is METHOD PATH HTTP/1.x'
                            ' (got %s)' % (cut(self.requestline) if words
                                           else 'an empty line'))
            return False
        return super().parse_request()

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (request line, headers) and
        here: one line too. An HTTP version it cannot speak is the
        client's mistake: 400, not 505."""
        if code >= 500:
            code = 400
        self.close_connection = True
        # A request line that could not be read leaves HTTP/0.9, which
        # would answer without a status line.
        self.request_version = 'HTTP/1.0'
        if message is None:
            message = self.responses.get(code, ('error',))[0]
        self.refuse(code, message)

    def refuse(self, status, message):
        """Answer a 4xx ``message``, and log it as one line."""
        line = one_line(message)
        self.logger.info('%s: %s: %d %s', self.server.name,
                         self.address_string(), status, line)
        self.answer_error(status, line)

    def answer_error(self, status, line):
        self.send_json(status, {'error': line})

    def send_json(self, status, answer):
        self.send_body(status, (json.dumps(answer, default=str)
                                + '\n').encode(), 'application/json')

    def send_body(self, status, data, ctype):
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def read_body(self, limit):
        """The request's body (b'' without one). ApiError 4xx for framing
        that is not HTTP/1.x's, or a body over ``limit`` bytes."""
        if self.headers.get('Transfer-Encoding'):
            raise ApiError(411, 'send the body with a Content-Length (no'
                           ' Transfer-Encoding)')
        lengths = self.headers.get_all('Content-Length') or []
        if len(set(v.strip() for v in lengths)) > 1:
            raise ApiError(400, 'Content-Length headers that disagree: %s'
                           % cut(', '.join(lengths)))
        if not lengths:
            return b''
        if not re.match(r'^\s*[0-9]{1,18}\s*$', lengths[0]):
            raise ApiError(400, 'Content-Length %s is not a number of bytes'
                           % cut(lengths[0]))
        length = int(lengths[0])
        if length > limit:
            # Read it (up to a limit) so that the client, still sending,
            # gets the answer instead of a reset connection.
            left = min(length, DRAIN_LIMIT)
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
            raise ApiError(413, 'body larger than %d bytes' % limit)
        data = self.rfile.read(length) if length else b''
        if len(data) < length:
            raise ApiError(400, 'body shorter than its Content-Length')
        return data
