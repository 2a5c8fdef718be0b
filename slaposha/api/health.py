"""Health checks for load balancers, as Patroni's /primary and /replica:

- ``/health/owner/<service>``: 200 only on the host where the service runs
  under its owner key, 503 elsewhere;
- ``/health/standby/<service>``: 200 only on a host that holds its lease,
  does not own the service and may take it over by itself (eligible: same
  SlapOS node facts, data copy within ``max_lag``, no failed hold);
  503 elsewhere.

The body is one line of text that says why. Both are routes of the HTTPS
API (any role); since most load balancers cannot show a client
certificate, the agent can also answer them, and nothing else, on a plain
HTTP port: ``[api] health_port`` (off by default) on ``[api]
health_listen`` (default: the host's address). What that port reveals is
the 200/503 and the reason, which name the service, its owner and token::

    self.health_api = HealthApi(agent, cluster, host).start()  # or no-op
    ...
    self.health_api.stop()
"""

import logging
import re
import threading

from slaposha.api.server import BoundedServer, RequestHandler, limits_of
from slaposha.config import ConfigError
from slaposha.inputs import cut

__all__ = ['check', 'HealthApi', 'CHECKS', 'CONTENT_TYPE']

logger = logging.getLogger(__name__)

CHECKS = ('owner', 'standby')
CONTENT_TYPE = 'text/plain; charset=utf-8'

_PATH = re.compile(r'^/health/(owner|standby)/([A-Za-z0-9_.-]{1,63})$')


class UnknownService(Exception):
    """The service is not one of this host's, as one line."""


def check(agent, kind, name):
    """(True or False, one-line reason) of the ``kind`` check of service
    ``name`` on ``agent``'s host; UnknownService when it has no such
    service."""
    local = agent.local_status()
    services = local.get('services') or {}
    svc = services.get(name)
    if svc is None:
        raise UnknownService('no service %r on %s (services here: %s)' % (
            name, local.get('host'), ', '.join(sorted(services)) or 'none'))
    lease = local.get('lease') or {}
    host = local.get('host')
    owner = svc.get('owner')
    if not lease.get('valid'):
        return False, '%s: %s holds no lease (%s)' % (
            name, host, lease.get('lost') or 'not granted yet')
    if kind == 'owner':
        if not svc.get('token'):
            return False, '%s: not owned by %s (owner: %s)' % (
                name, host, owner or 'none')
        if svc.get('state') != 'running':
            return False, '%s: owned by %s (token %s) but %s' % (
                name, host, svc['token'], svc.get('state'))
        return True, '%s: runs on %s (token %s)' % (name, host, svc['token'])
    if svc.get('token') or svc.get('state') == 'running':
        return False, '%s: %s is the owner, not a standby' % (name, host)
    if local.get('etcd') != 'ok':
        return False, '%s: %s cannot read the cluster: %s' % (
            name, host, local.get('etcd'))
    if svc.get('failed'):
        return False, '%s: %s failed to run it and leaves it to the others' \
            ' for now' % (name, host)
    if svc.get('ineligible'):
        return False, '%s: %s may not take it over: %s' % (
            name, host, svc['ineligible'][0])
    ages = ', '.join('%s copy %.1f s old' % (rid, lag)
                     for rid, lag in sorted((svc.get('lags') or {}).items())
                     if lag is not None)
    return True, '%s: %s is an eligible standby (owner: %s%s)' % (
        name, host, owner or 'none', '; ' + ages if ages else '')


class _Handler(RequestHandler):
    server_version = 'slaposha-health'

    def answer_error(self, status, line):
        self._answer(status, 'bad request: %s' % line if status == 400
                     else line)

    def _answer(self, status, text):
        self.send_body(status, (text + '\n').encode(), CONTENT_TYPE)

    def do_GET(self):
        m = _PATH.match(self.path.split('?', 1)[0])
        if not m:
            self._answer(404, 'only /health/owner/<service> and'
                         ' /health/standby/<service> are served here')
            return
        try:
            ok, reason = check(self.server.agent, m.group(1), m.group(2))
        except UnknownService as e:
            self._answer(404, str(e))
            return
        except Exception as e:  # a bug of ours: unhealthy, and say so
            logger.exception('health: %s failed', cut(self.path))
            self._answer(503, 'internal error: %s' % type(e).__name__)
            return
        self._answer(200 if ok else 503, reason)

    do_HEAD = do_GET

    def __getattr__(self, name):
        if name.startswith('do_'):
            return lambda: self._answer(405, 'use GET or HEAD')
        raise AttributeError(name)


class _Server(BoundedServer):
    name = 'health'


class HealthApi(object):
    """The plain-HTTP health port of ``agent`` (``[api] health_port``;
    ``port`` overrides it, 0 takes a free one); off when neither is set."""

    def __init__(self, agent, cluster, host, port=None, listen=None):
        self.agent = agent
        self.cluster = cluster
        self.listen = listen or cluster.api.health_listen or \
            cluster.hosts[host].address
        self.port = cluster.api.health_port if port is None else port
        self.server = None

    def start(self):
        if self.port is None:
            return self
        try:
            self.server = _Server((self.listen, self.port), _Handler,
                                  limits_of(self.cluster.api))
        except OSError as e:
            raise ConfigError(self.cluster.path, 'api', 'health_port',
                              'cannot listen on %s port %d: %s' % (
                                  self.listen, self.port, e.strerror or e))
        self.server.agent = self.agent
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name='health-api',
                         daemon=True).start()
        logger.info('api: plain-HTTP health checks on %s port %d',
                    self.listen, self.port)
        return self

    @property
    def url(self):
        if self.server is None:
            return None
        host = '[%s]' % self.listen if ':' in self.listen else self.listen
        return 'http://%s:%d' % (host, self.port)

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
