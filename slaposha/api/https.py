"""The agent's API over HTTPS with mutual TLS: port 1215 (``[api] port``),
on the host's address (``[api] listen``).

Every client shows a certificate of the cluster CA (``ssl.CERT_REQUIRED``:
no certificate, another CA's or an expired one ends the TLS handshake);
one that the cluster's revocation list (``crl.pem`` in ``ssl_dir``, read again
when it changes) names is refused with 403. The certificate's role
(:mod:`slaposha.pki`) decides what it may do:

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

The routes are :data:`ROUTES`; ``slaposha/api/openapi.json`` describes them
(served as ``GET /openapi.json``). Errors are ``{"error": "<one line>"}``:
4xx for whatever the client did wrong, never a 5xx for bad input, and a bad
request never ends the server or one of its threads.

The agent starts it beside the unix socket API::

    from slaposha.api.https import HttpsApi
    self.https_api = HttpsApi(self, self.cluster, self.host).start()
    ...
    self.https_api.stop()

When the cluster has no CA yet (no ``ca.crt`` in ``ssl_dir``) the API stays
off and says so in one log line.
"""

import collections
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time

from slaposha import metrics, pki
from slaposha.api import (
    ACTION_FIELDS, ON_BEHALF, ApiError, MAX_BODY, _body, dispatch, health)
from slaposha.api.server import BoundedServer, RequestHandler, limits_of
from slaposha.cluster.etcd import EtcdError
from slaposha.config import CLUSTER_SCHEMA, ConfigError
from slaposha.inputs import cut, one_line

__all__ = ['HttpsApi', 'ROUTES', 'PERMISSIONS', 'OPENAPI_PATH']

logger = logging.getLogger(__name__)

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

POLL_INTERVAL = 0.5        # the event stream reads the status this often
KEEPALIVE = 15.0           # a comment on an idle event stream this often
DECISIONS_KEPT = 1000


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


class Identity(object):
    """Who a client certificate says the client is."""

    def __init__(self, role, name, serial):
        self.role = role
        self.name = name
        self.serial = serial

    def __str__(self):
        return '%s (%s)' % (self.name, self.role)


def identify_peer(conn, revocations):
    """The Identity that the client certificate of ``conn`` (a TLS
    connection) shows; ApiError 403 when it is revoked or names no role,
    503 when the revocation list is unusable."""
    cert = conn.getpeercert()
    if not cert:  # CERT_REQUIRED makes this impossible; be sure
        raise ApiError(403, 'no client certificate')
    role, name = pki.role_from_peercert(cert)
    try:
        serial = int(cert.get('serialNumber', ''), 16)
    except ValueError:
        raise ApiError(403, 'client certificate without a serial number')
    try:
        revoked = revocations.is_revoked(serial)
    except pki.PkiError as e:
        logger.error('api: every client refused: %s', e)
        raise ApiError(503, 'the revocation list is unusable (%s): every'
                       ' certificate is refused until it is fixed' % e)
    if revoked:
        raise ApiError(403, 'the certificate of %s (serial %s) is revoked'
                       % (name, pki.serial_text(serial)))
    if role is None:
        raise ApiError(403, 'the certificate of %s names no slaposha role'
                       ' (a SAN URI %s<role>)' % (name, pki.ROLE_URI_PREFIX))
    return Identity(role, name, serial)


def server_context(ca, cert, key):
    """The TLS side of a server that shows ``cert`` and requires client
    certificates of ``ca``; ssl.SSLError or OSError for unusable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


_VOLATILE = frozenset(['time', 'time_left'])


def _stable(value):
    """The status without what changes at every call (clocks)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if k not in _VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    return value


class _Text(object):
    """An answer that is not JSON: its text and Content-Type."""

    def __init__(self, data, ctype):
        self.data = data
        self.ctype = ctype


class _Handler(RequestHandler):
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
            if isinstance(answer, _Text):
                logger.debug('api: %s %s %s: %d', who, cut(method),
                             cut(path), status)
                self.send_body(status, answer.data.encode(), answer.ctype)
                return
        except ApiError as e:
            status, answer = e.status, {'error': one_line(e)}
        except OSError:
            raise   # the connection's (a deadline, a client gone)
        except Exception as e:
            # A bug of ours, not the client's: say so, and keep serving.
            logger.exception('api: %s %s failed', cut(method), cut(path))
            status, answer = 500, {'error': 'internal error: %s'
                                   % one_line('%s: %s' % (
                                       type(e).__name__, e))}
        level = logging.INFO if method != 'GET' or status == 403 \
            else logging.DEBUG
        logger.log(level, 'api: %s %s %s: %d %s', who or
                   self.address_string(), cut(method), cut(path), status,
                   one_line(answer.get('error') or answer.get('message')
                            or 'ok') if isinstance(answer, dict) else 'ok')
        self.send_json(status, answer)

    # -- routes ---------------------------------------------------------------

    def _route_openapi(self, who, params, raw):
        return 200, self.server.api.openapi

    def _route_whoami(self, who, params, raw):
        return 200, {'name': who.name, 'role': who.role,
                     'serial': pki.serial_text(who.serial),
                     'may': list(PERMISSIONS[who.role])}

    def _route_status(self, who, params, raw):
        return dispatch(self.server.api.agent, 'GET', '/status')

    def _route_local(self, who, params, raw):
        return dispatch(self.server.api.agent, 'GET', '/local')

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
        body = _body(raw, dict(ACTION_FIELDS, **{'for': str}))
        behalf = body.pop('for', None)
        if behalf is not None and not ON_BEHALF.match(behalf):
            raise ApiError(400, 'field \'for\' must be a name of at most 64'
                           ' letters, digits, spaces or "_.@-" (got %s)'
                           % cut(behalf))
        if who.role == pki.HOST_ROLE:
            # A peer relays an operator's action: it names who.
            body.setdefault('by', 'host %s' % who.name)
        else:
            if 'by' in body:
                raise ApiError(400, 'unknown field \'by\': who acts is'
                               ' taken from the client certificate')
            body['by'] = '%s %s' % (who.role, who.name)
        if behalf is not None:
            body['by'] += ' for %s' % behalf
        return dispatch(self.server.api.agent, 'POST', '/services/%s/%s'
                        % (params['name'], params['action']),
                        json.dumps(body).encode())

    def _route_decisions(self, who, params, raw):
        api = self.server.api
        return 200, {'host': api.host, 'decisions': api.decisions()}

    def _route_config(self, who, params, raw):
        return 200, self.server.api.config()

    def _route_history(self, who, params, raw):
        api = self.server.api
        read = getattr(api.agent, 'history', None)
        try:
            entries = read() if read is not None else []
        except EtcdError as e:
            raise ApiError(503, 'cannot read the history from etcd: %s'
                           % one_line(e))
        return 200, {'host': api.host, 'history': entries}

    def _route_metrics(self, who, params, raw):
        return 200, _Text(metrics.exposition(self.server.api.agent),
                          metrics.CONTENT_TYPE)

    def _route_ui(self, who, params, raw):
        return 200, _Text(self.server.api.ui, 'text/html; charset=utf-8')

    def _health(self, kind, name):
        try:
            ok, reason = health.check(self.server.api.agent, kind, name)
        except health.UnknownService as e:
            raise ApiError(404, str(e))
        return (200 if ok else 503), _Text(reason + '\n',
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
        logger.info('api: %s: event stream opened', who)
        try:
            self.server.api.stream(self.connection, self.wfile.write)
        except OSError as e:   # the client left while we wrote
            logger.debug('api: %s: event stream: %s', who, e)
        logger.info('api: %s: event stream closed', who)
        return None


class _Server(BoundedServer):
    name = 'api'

    def serve_connection(self, request, client_address, slot):
        """The TLS handshake happens here, in the connection's thread, so
        that a slow or silent client never holds up the others; then the
        connection counts for the client's certificate."""
        where = '%s:%s' % client_address[:2]
        request.settimeout(max(slot.remaining(), 0.001))
        try:
            # Since Python 3.5, the timeout bounds the whole handshake.
            conn = self.api.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            logger.info('api: %s: TLS handshake refused: %s', where,
                        one_line(getattr(e, 'reason', None) or e))
            return
        try:
            refusal = None
            cert = conn.getpeercert() or {}
            if not slot.become(('certificate', cert.get('serialNumber'))):
                name = pki.role_from_peercert(cert)[1]
                logger.warning('api: %s (%s) refused: its certificate has'
                               ' %d connections open (the limit of one'
                               ' client)', name, where,
                               self.limits.max_client_connections)
                refusal = (429, 'the certificate of %s has %d connections'
                           ' open: the limit of one client' % (
                               name, self.limits.max_client_connections))
            self.RequestHandlerClass(conn, client_address, self, slot,
                                     refusal)
        except OSError as e:
            logger.debug('api: %s: %s', where, e)
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()


class HttpsApi(object):
    """The HTTPS API of ``agent`` (anything with ``cluster_status()``,
    ``local_status()`` and ``action(name, verb, params)``), for ``host`` of
    ``cluster``. ``port`` and ``listen`` override ``[api]``; port 0 takes a
    free one (see :attr:`port`)."""

    def __init__(self, agent, cluster, host, port=None, listen=None):
        self.agent = agent
        self.cluster = cluster
        self.host = host
        self.listen = listen or cluster.api.listen or \
            cluster.hosts[host].address
        self.port = cluster.api.port if port is None else port
        self.server = None
        self.context = None
        self.revocations = None
        self.openapi = None
        self.ui = None
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._subscribers = 0
        self._status = None
        self._status_key = None
        self._decisions = collections.deque(maxlen=DECISIONS_KEPT)
        self._last_decision = {}
        self._threads = []

    # -- life cycle -----------------------------------------------------------

    def files(self):
        """(ca, cert, key, crl) paths in the cluster's ssl_dir."""
        d = self.cluster.ssl_dir
        return tuple(os.path.join(d, n) for n in (
            'ca.crt', self.host + '.crt', self.host + '.key', 'crl.pem'))

    def _context(self):
        ca, cert, key, crl = self.files()
        for path in (cert, key):
            if not os.access(path, os.R_OK):
                raise ConfigError(self.cluster.path, 'cluster', 'ssl_dir',
                                  '%s has a CA but %s is missing or'
                                  ' unreadable (slaposha cluster join)'
                                  % (self.cluster.ssl_dir, path))
        mode = os.stat(key).st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(self.cluster.path, 'cluster', 'ssl_dir',
                              '%s: a private key readable by others (mode'
                              ' %o): chmod 600 it' % (key, mode))
        try:
            ca_cert = pki.load_cert(ca)
            ctx = server_context(ca, cert, key)
        except (pki.PkiError, ssl.SSLError, OSError) as e:
            raise ConfigError(self.cluster.path, 'cluster', 'ssl_dir',
                              'cannot use %s, %s and %s: %s'
                              % (ca, cert, key, one_line(e)))
        self.revocations = pki.Revocations(crl, ca_cert)
        return ctx

    def start(self):
        ca = self.files()[0]
        if not os.path.exists(ca):
            logger.warning('api: HTTPS API off: no cluster CA (%s); see'
                           ' `slaposha cluster init`', ca)
            return self
        self.context = self._context()
        with open(OPENAPI_PATH) as f:
            self.openapi = json.load(f)
        with open(UI_PATH) as f:
            self.ui = f.read()
        try:
            self.server = _Server((self.listen, self.port), _Handler,
                                  limits_of(self.cluster.api))
        except OSError as e:
            raise ConfigError(self.cluster.path, 'api', 'port', 'cannot'
                              ' listen on %s port %d: %s' % (
                                  self.listen, self.port,
                                  e.strerror or e))
        self.server.api = self
        self.port = self.server.server_address[1]
        self._closing.clear()
        for target, name in ((self.server.serve_forever, 'https-api'),
                             (self._poll, 'https-api-poll')):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info('api: HTTPS on %s port %d (client certificates of %s)',
                    self.listen, self.port, ca)
        return self

    @property
    def url(self):
        if self.server is None:
            return None
        host = '[%s]' % self.listen if ':' in self.listen else self.listen
        return 'https://%s:%d' % (host, self.port)

    def stop(self):
        self._closing.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for thread in self._threads:
            thread.join(5)
        self._threads = []

    # -- who is asking --------------------------------------------------------

    def identify(self, conn):
        who = identify_peer(conn, self.revocations)
        if who.role == pki.HOST_ROLE and who.name not in self.cluster.members:
            raise ApiError(403, 'a host certificate for %r, which is not a'
                           ' host of this cluster' % who.name)
        return who

    # -- data -----------------------------------------------------------------

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

    def decisions(self):
        # The agent's own log has every decision; the sampled one is for
        # agents (and test stand-ins) that keep none.
        log = getattr(self.agent, 'decision_log', None)
        if log is not None:
            return list(log)
        with self._cond:
            return sorted(self._decisions, key=lambda d: d['time'] or 0)

    def config(self):
        cluster = self.cluster
        sections = {name: getattr(cluster, name).as_dict()
                    for name in CLUSTER_SCHEMA if hasattr(cluster, name)
                    and not isinstance(getattr(cluster, name), dict)}
        confs = getattr(self.agent, 'confs', None) or {}
        return {
            'path': cluster.path, 'cluster': sections,
            'hosts': {h: s.as_dict() for h, s in cluster.hosts.items()},
            'services': {
                name: {'path': conf.path,
                       'service': conf.service.as_dict(),
                       'resources': [r.as_dict() for r in conf.resources]}
                for name, conf in sorted(confs.items())},
        }

    # -- polling: the decision log and the event stream -----------------------

    def _record(self, local):
        services = local.get('services') if isinstance(local, dict) else None
        with self._cond:
            for name, svc in (services or {}).items():
                decision = svc.get('decision') if isinstance(svc, dict) \
                    else None
                if not decision or len(decision) != 3:
                    continue
                decision = tuple(decision)
                if self._last_decision.get(name) == decision:
                    continue
                self._last_decision[name] = decision
                self._decisions.append({
                    'service': name, 'time': decision[0],
                    'action': decision[1], 'reason': decision[2]})

    def _poll(self):
        while not self._closing.is_set():
            try:
                self._record(self.agent.local_status())
            except Exception:
                logger.exception('api: cannot read the local status')
            with self._cond:
                listening = self._subscribers > 0
            if listening:
                try:
                    status = self.agent.cluster_status()
                    key = json.dumps(_stable(status), sort_keys=True,
                                     default=str)
                except Exception:
                    logger.exception('api: cannot read the cluster status')
                else:
                    with self._cond:
                        if key != self._status_key:
                            self._status, self._status_key = status, key
                            self._cond.notify_all()
            else:
                with self._cond:
                    self._status = self._status_key = None
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()

    def stream(self, conn, write):
        """Write server-sent events to ``write``: the status now, then each
        time it changes; until the client leaves or the API stops."""
        with self._cond:
            self._subscribers += 1
        self._wake.set()
        try:
            sent_key = None
            number = 0
            last_write = time.monotonic()
            while not self._closing.is_set():
                with self._cond:
                    if self._status_key in (None, sent_key):
                        self._cond.wait(POLL_INTERVAL)
                    status, key = self._status, self._status_key
                if key is not None and key != sent_key:
                    number += 1
                    write(('id: %d\nevent: status\ndata: %s\n\n' % (
                        number, json.dumps(status, default=str))).encode())
                    sent_key = key
                    last_write = time.monotonic()
                elif time.monotonic() - last_write >= KEEPALIVE:
                    write(b': keepalive\n\n')
                    last_write = time.monotonic()
                if _client_left(conn):
                    return
        finally:
            with self._cond:
                self._subscribers -= 1


def _client_left(conn):
    """True when the client closed its end (it sends nothing on a stream)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        timeout = conn.gettimeout()
        conn.settimeout(0.05)
        try:
            return conn.recv(4096) == b''
        finally:
            conn.settimeout(timeout)
    except ssl.SSLWantReadError:
        return False
    except socket.timeout:
        return False
    except OSError:
        return True
