"""The agent's routes: one table, :data:`ROUTES`, that both of its APIs
serve with one request handler, :class:`RouteHandler`. They differ only in
who may call what: on the HTTPS API (:mod:`slaposha.api.https`) the role
of the client's certificate (:mod:`slaposha.pki`) decides; the unix socket
(:mod:`slaposha.api.local`, mode 0600) is root's, who may everything.

============  =====================================================
role          may
============  =====================================================
``guest``     read: every GET but ``/config``
``operator``  read, and act: start, stop, switch, takeover, freeze, thaw
``admin``     read, act, and read the configuration (``GET /config``)
``root``      everything
``host``      everything, as root (for now: peers, and the software
              release on a host, will get narrower rights when they
              use the API)
============  =====================================================

``slaposha/api/openapi.json`` describes the routes (served as ``GET
/openapi.json``). Errors are ``{"error": "<one line>"}``: 4xx for whatever
the client did wrong, never a 5xx for bad input, and a bad request never
ends the server or one of its threads.
"""

import json
import logging
import os
import re
from collections import namedtuple

from slaposha import metrics, pki
from slaposha.actions import ActionError
from slaposha.api import (
    ACTION_FIELDS, ACTIONS, MAX_BODY, ON_BEHALF, ApiError, health,
    parse_body)
from slaposha.api.events import StatusFeed
from slaposha.api.server import RequestHandler
from slaposha.cluster.etcd import EtcdError
from slaposha.config import CLUSTER_SCHEMA
from slaposha.inputs import cut, one_line

__all__ = ['ROUTES', 'PERMISSIONS', 'OPENAPI_PATH', 'UI_PATH', 'Route',
           'find_route', 'Identity', 'Text', 'RouteHandler', 'AgentApi']

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            'openapi.json')
# The status page: one HTML file, its script and style inline.
UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'ui.html')

# What each role may do: 'read' (GET), 'act' (service actions), 'config'.
PERMISSIONS = {
    'guest': ('read',),
    'operator': ('read', 'act'),
    'admin': ('read', 'act', 'config'),
    'root': ('read', 'act', 'config'),
    # Hosts do what root does, for now.
    'host': ('read', 'act', 'config'),
}
# The least role that has a permission, for the 403 messages.
_LEAST_ROLE = {'read': 'guest', 'act': 'operator', 'config': 'admin'}
# What an action's path may name.
_SERVICE = re.compile(r'^[A-Za-z0-9_.-]{1,63}$')
_ACTION = re.compile(r'^[a-z]+$')


class Route(object):
    """One route: ``{name}`` in the template matches one path segment."""

    def __init__(self, method, template, permission, handler):
        self.method = method
        self.template = template
        self.permission = permission
        self.handler = handler
        self.regex = re.compile('^' + re.sub(
            r'\\\{(\w+)\\\}', r'(?P<\1>[^/]+)', re.escape(template)) + '$')


ROUTES = (
    Route('GET', '/openapi.json', 'read', 'openapi'),
    Route('GET', '/whoami', 'read', 'whoami'),
    Route('GET', '/status', 'read', 'status'),
    Route('GET', '/local', 'read', 'local'),
    Route('GET', '/services', 'read', 'services'),
    Route('GET', '/services/{name}', 'read', 'service'),
    Route('POST', '/services/{name}/{action}', 'act', 'action'),
    Route('GET', '/decisions', 'read', 'decisions'),
    Route('GET', '/events', 'read', 'events'),
    Route('GET', '/config', 'config', 'config'),
    Route('GET', '/history', 'read', 'history'),
    Route('GET', '/metrics', 'read', 'metrics'),
    Route('GET', '/ui', 'read', 'ui'),
    Route('GET', '/health/owner/{name}', 'read', 'health_owner'),
    Route('GET', '/health/standby/{name}', 'read', 'health_standby'),
)


def find_route(method, path, routes=ROUTES):
    """(route, parameters); ApiError 404 or 405."""
    methods = []
    for route in routes:
        m = route.regex.match(path)
        if m:
            if route.method == method:
                return route, m.groupdict()
            methods.append(route.method)
    if methods:
        raise ApiError(405, '%s %s: use %s' % (cut(method), cut(path),
                                               ' or '.join(methods)))
    raise ApiError(404, 'no such route: %s %s (see /openapi.json)'
                   % (cut(method), cut(path)))


class Identity(namedtuple('Identity', 'role name serial names_who_acts'
                          ' acts_as', defaults=(False, None))):
    """Who a client is: its ``role`` and ``name`` (a certificate's, or root
    on the unix socket), its certificate's ``serial`` (None without one).
    ``acts_as``: who acts, for the history, when the client acts; with
    ``names_who_acts`` the client may say it instead (``by``): a peer that
    relays an operator's action, root's tools on the host."""

    __slots__ = ()

    def __str__(self):
        return '%s (%s)' % (self.name, self.role)


class Text(object):
    """An answer that is not JSON: its text and Content-Type."""

    def __init__(self, data, ctype):
        self.data = data
        self.ctype = ctype


class RouteHandler(RequestHandler):
    """One request: who asks (``server.api.identify``), its route, whether
    the role may, then the route's ``_route_<handler>(who, params, raw)``:
    (status, answer) or None when it streamed its answer itself. Its log
    lines go to the server's logger."""

    server_version = 'slaposha'
    routes = ROUTES   # the portal serves its own with this handler

    def __getattr__(self, name):
        # Any method: the routes answer 405 or 404 (never 501).
        if name.startswith('do_'):
            return self._serve
        raise AttributeError(name)

    # -- one request ----------------------------------------------------------

    def _serve(self):
        api = self.server.api
        method = self.command
        path = self.path.split('?', 1)[0].split('#', 1)[0]
        who = None
        try:
            raw = self.read_body(MAX_BODY)
            who = api.identify(self.connection)
            route, params = find_route(method, path, self.routes)
            if route.permission not in PERMISSIONS[who.role]:
                raise ApiError(403, '%s %s needs role %s or above: your'
                               ' certificate (%s) has role %s' % (
                                   method, route.template,
                                   _LEAST_ROLE[route.permission], who.name,
                                   who.role))
            answer = getattr(self, '_route_' + route.handler)(who, params,
                                                              raw)
            if answer is None:  # streamed
                return
            status, answer = answer
            if isinstance(answer, Text):
                self.logger.debug('api: %s %s %s: %d', who, cut(method),
                                  cut(path), status)
                self.send_body(status, answer.data.encode(), answer.ctype)
                return
        except ApiError as e:
            status, answer = e.status, {'error': one_line(e)}
        except OSError:
            raise   # the connection's (a deadline, a client gone)
        except Exception as e:
            # A bug of ours, not the client's: say so, and keep serving.
            self.logger.exception('api: %s %s failed', cut(method),
                                  cut(path))
            status, answer = 500, {'error': 'internal error: %s'
                                   % one_line('%s: %s' % (
                                       type(e).__name__, e))}
        level = logging.INFO if method != 'GET' or status == 403 \
            else logging.DEBUG
        self.logger.log(level, 'api: %s %s %s: %d %s', who or
                        self.address_string(), cut(method), cut(path),
                        status, one_line(answer.get('error') or
                                         answer.get('message') or 'ok')
                        if isinstance(answer, dict) else 'ok')
        self.send_json(status, answer)

    # -- routes ---------------------------------------------------------------

    def _route_openapi(self, who, params, raw):
        return 200, self.server.api.openapi

    def _route_whoami(self, who, params, raw):
        return 200, {'name': who.name, 'role': who.role,
                     'serial': None if who.serial is None
                     else pki.serial_text(who.serial),
                     'may': list(PERMISSIONS[who.role])}

    def _route_status(self, who, params, raw):
        return 200, self.server.api.agent.cluster_status()

    def _route_local(self, who, params, raw):
        return 200, self.server.api.agent.local_status()

    def _route_services(self, who, params, raw):
        return 200, self.server.api.services()

    def _route_service(self, who, params, raw):
        answer = self.server.api.services()
        name = params['name']
        if name not in answer['services']:
            raise ApiError(404, 'no service %s (services: %s)' % (
                cut(name), ', '.join(sorted(answer['services'])) or 'none'))
        return 200, dict(answer['services'][name], name=name,
                         source=answer['source'], etcd=answer['etcd'])

    def _route_action(self, who, params, raw):
        ctype = (self.headers.get('Content-Type') or '').split(';')[0]
        if raw and ctype.strip().lower() not in ('', 'application/json'):
            raise ApiError(415, 'the body must be application/json (got %s)'
                           % cut(ctype))
        body = parse_body(raw, dict(ACTION_FIELDS, **{'for': str}))
        behalf = body.pop('for', None)
        if behalf is not None and not ON_BEHALF.match(behalf):
            raise ApiError(400, 'field \'for\' must be a name of at most 64'
                           ' letters, digits, spaces or "_.@-" (got %s)'
                           % cut(behalf))
        if who.names_who_acts:
            if who.acts_as is not None:
                body.setdefault('by', who.acts_as)
        elif 'by' in body:
            raise ApiError(400, 'unknown field \'by\': who acts is'
                           ' taken from the client certificate')
        else:
            body['by'] = who.acts_as
        if behalf is not None:
            body['by'] = '%s for %s' % (body.get('by') or who.name, behalf)
        name, verb = params['name'], params['action']
        if not _SERVICE.match(name) or not _ACTION.match(verb):
            raise ApiError(404, 'no such route: %s %s' % (
                cut(self.command), cut('/services/%s/%s' % (name, verb))))
        if verb not in ACTIONS:
            raise ApiError(404, 'unknown action %s (actions: %s)'
                           % (cut(verb), ', '.join(ACTIONS)))
        try:
            return 200, {'message': self.server.api.agent.action(
                name, verb, body)}
        except ActionError as e:
            status = 404 if str(e).startswith('no service') else 409
            raise ApiError(status, str(e))

    def _route_decisions(self, who, params, raw):
        api = self.server.api
        return 200, {'host': api.host,
                     'decisions': list(api.agent.decision_log)}

    def _route_config(self, who, params, raw):
        return 200, self.server.api.config()

    def _route_history(self, who, params, raw):
        api = self.server.api
        try:
            entries = api.agent.history()
        except EtcdError as e:
            raise ApiError(503, 'cannot read the history from etcd: %s'
                           % one_line(e))
        return 200, {'host': api.host, 'history': entries}

    def _route_metrics(self, who, params, raw):
        return 200, Text(metrics.exposition(self.server.api.agent),
                         metrics.CONTENT_TYPE)

    def _route_ui(self, who, params, raw):
        return 200, Text(self.server.api.ui, 'text/html; charset=utf-8')

    def _health(self, kind, name):
        try:
            ok, reason = health.check(self.server.api.agent, kind, name)
        except health.UnknownService as e:
            raise ApiError(404, str(e))
        return (200 if ok else 503), Text(reason + '\n',
                                          health.CONTENT_TYPE)

    def _route_health_owner(self, who, params, raw):
        return self._health('owner', params['name'])

    def _route_health_standby(self, who, params, raw):
        return self._health('standby', params['name'])

    def _route_events(self, who, params, raw):
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        self.logger.info('api: %s: event stream opened', who)
        try:
            self.server.api.feed.stream(self.connection, self.wfile.write)
        except OSError as e:   # the client left while we wrote
            self.logger.debug('api: %s: event stream: %s', who, e)
        self.logger.info('api: %s: event stream closed', who)
        return None


class AgentApi(object):
    """What both APIs of ``agent`` (anything with ``cluster_status()``,
    ``local_status()``, ``action(name, verb, params)``, ``history()``,
    ``decision_log`` and ``confs``) answer for ``host`` of ``cluster``.
    A subclass adds its server (whose ``api`` this is) and
    :meth:`identify`; :meth:`load` reads the description and the page,
    :attr:`feed` serves the event streams."""

    def __init__(self, agent, cluster, host, logger):
        self.agent = agent
        self.cluster = cluster
        self.host = host
        self.openapi = None
        self.ui = None
        self.feed = StatusFeed(agent, logger)

    def load(self):
        with open(OPENAPI_PATH) as f:
            self.openapi = json.load(f)
        with open(UI_PATH) as f:
            self.ui = f.read()

    def identify(self, conn):
        """The Identity of the client of ``conn``; ApiError 403 when it may
        not ask at all."""
        raise NotImplementedError

    def services(self):
        """The services and their resources: as the cluster knows them,
        or, when etcd cannot be read, as this agent knows them."""
        status = self.agent.cluster_status()
        services = status.get('services')
        source = 'cluster'
        if services is None:
            services = (status.get('local') or
                        self.agent.local_status()).get('services') or {}
            source = 'local'
        return {'host': self.host, 'etcd': status.get('etcd', 'ok'),
                'source': source, 'services': services}

    def config(self):
        cluster = self.cluster
        sections = {name: getattr(cluster, name).as_dict()
                    for name in CLUSTER_SCHEMA if hasattr(cluster, name)
                    and not isinstance(getattr(cluster, name), dict)}
        return {
            'path': cluster.path, 'cluster': sections,
            'hosts': {h: s.as_dict() for h, s in cluster.hosts.items()},
            'services': {
                name: {'path': conf.path,
                       'service': conf.service.as_dict(),
                       'resources': [r.as_dict() for r in conf.resources]}
                for name, conf in sorted(self.agent.confs.items())},
        }
