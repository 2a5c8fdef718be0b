"""The API on a unix socket (mode 0600, root only): how the ``slaposha``
CLI talks to the agent of its own host. It serves the agent's routes
(:mod:`slaposha.api.routes`), all of them to root; who acts is who the
request says (``by``), else the agent names the host's operator."""

import http.client
import json
import logging
import os
import socket
import threading

from slaposha.api.routes import AgentApi, Identity, RouteHandler
from slaposha.api.server import BoundedServer

__all__ = ['LocalApi', 'call', 'AgentUnreachable']

logger = logging.getLogger(__name__)


class AgentUnreachable(Exception):
    """No agent answers on the socket, as one line."""


class _Server(BoundedServer):
    name = 'local api'


class LocalApi(AgentApi):
    """The API of ``agent`` on the unix socket ``path`` within ``limits``
    (the [api] section's, :func:`slaposha.api.server.limits_of`); its
    clients are root's: one client, that may use every connection."""

    def __init__(self, agent, path, limits):
        super().__init__(agent, agent.cluster, agent.host, logger)
        self.path = path
        self.limits = limits._replace(
            max_client_connections=limits.max_connections)
        self.server = None
        self.root = Identity('root', 'root on %s' % agent.host, None,
                             names_who_acts=True)

    def start(self):
        self.load()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.server = _Server(self.path, RouteHandler, self.limits)
        finally:
            os.umask(old)
        self.server.api = self
        threading.Thread(target=self.server.serve_forever, name='local-api',
                         daemon=True).start()
        self.feed.start('local-api-poll')
        return self

    def stop(self):
        self.feed.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def identify(self, conn):
        return self.root


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
