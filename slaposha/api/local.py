"""The API on a unix socket (mode 0600, root only): how the ``slaposha``
CLI talks to the agent of its own host."""

import http.client
import http.server
import json
import logging
import os
import socket
import socketserver
import threading

from slaposha.api import MAX_BODY, dispatch

__all__ = ['LocalApi', 'call', 'AgentUnreachable']

logger = logging.getLogger(__name__)


class AgentUnreachable(Exception):
    """No agent answers on the socket, as one line."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'

    def address_string(self):
        return 'local'

    def log_message(self, format, *args):
        logger.debug('api: ' + format, *args)

    def _answer(self, method):
        length = int(self.headers.get('Content-Length') or 0)
        if length > MAX_BODY:
            status, answer = 413, {'error': 'body larger than %d bytes'
                                   % MAX_BODY}
        else:
            raw = self.rfile.read(length) if length else b''
            status, answer = dispatch(self.server.agent, method, self.path,
                                      raw)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer('GET')

    def do_POST(self):
        self._answer('POST')


class LocalApi(object):

    def __init__(self, agent, path):
        self.agent = agent
        self.path = path
        self.server = None

    def start(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.server = _Server(self.path, _Handler)
        finally:
            os.umask(old)
        self.server.agent = self.agent
        threading.Thread(target=self.server.serve_forever, name='local-api',
                         daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__('localhost', timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(path, method, route, body=None, timeout=30):
    """(status, answer) of one request to the agent on ``path``."""
    conn = _UnixConnection(path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {'Content-Type': 'application/json'} if data else {}
        conn.request(method, route, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode())
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise AgentUnreachable('no agent answers on %s (%s): is `slaposha'
                               ' agent` running on this host?' % (path, e))
    finally:
        conn.close()
