"""The portal's HTTPS server: its page, its JSON API (``openapi.json``
beside this file) and the actions it relays.

It is the agents' API server (:mod:`slaposha.api.https`: TLS handshake in
each connection's thread, bounded connections; :mod:`slaposha.api.routes`:
one-line JSON errors, the same roles) with the portal's own routes, trust
and data:

- clients show a certificate of the portal CA (``ca.crt`` in the portal's
  ``ssl_dir``; ``crl.pem`` beside it revokes); ``guest`` reads, ``operator``,
  ``admin`` and ``root`` also act; ``host`` certificates (the portal's own)
  are refused;
- an action needs both the user's role and the role of the portal's
  certificate on that cluster; the cluster records it under the portal's
  certificate, the portal's log under the user's;
- a POST must be JSON and, when the browser says where it comes from
  (``Origin``), come from the portal's own page.
"""

import base64
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from urllib.parse import parse_qs, urlsplit

from slaposha import pki
from slaposha.api import ACTIONS, ApiError, parse_body
from slaposha.api.client import ApiRefused, ApiUnreachable
from slaposha.api.https import (_Server as _ApiServer, identify_peer,
                                server_context)
from slaposha.api.routes import (PERMISSIONS, UI_PATH, Route, RouteHandler,
                                 Text)
from slaposha.api.server import Limits
from slaposha.config import ConfigError
from slaposha.inputs import cut, one_line
from slaposha.portal.feed import ClusterFeed, certificate_may_act
from slaposha.portal.view import (CLUSTER_STATES, SERVICE_STATES, Filters,
                                  cluster_view, select)

__all__ = ['Portal', 'ROUTES', 'OPENAPI_PATH', 'PAGE_PATH']

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_PATH = os.path.join(HERE, 'openapi.json')
PAGE_PATH = os.path.join(HERE, 'page.html')

# An action's body: where to, past the eligibility checks, and the token the
# operator saw when confirming (refused when the service moved since).
ACTION_FIELDS = {'to': str, 'force': bool, 'token': int, 'at': str}
FILTER_KEYS = ('cluster', 'site', 'state')
EVENTS_MIN_INTERVAL = 0.2   # a burst of news makes one event
DECISIONS_SHOWN = 100

ROUTES = (
    Route('GET', '/', 'read', 'page'),
    Route('GET', '/openapi.json', 'read', 'openapi'),
    Route('GET', '/api/whoami', 'read', 'whoami'),
    Route('GET', '/api/view', 'read', 'view'),
    Route('GET', '/api/events', 'read', 'events'),
    Route('GET', '/api/clusters/{cluster}', 'read', 'cluster'),
    Route('GET', '/api/clusters/{cluster}/services/{name}', 'read',
          'service'),
    Route('POST', '/api/clusters/{cluster}/services/{name}/{action}', 'act',
          'action'),
)



def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(
        hashlib.sha256(text.encode()).digest()).decode()


def load_page():
    """(the page, its Content-Security-Policy): the portal's page with the
    style of the agents' status page, its inline script and style allowed
    by their hashes and nothing else."""
    with open(UI_PATH) as f:
        agent_style = re.search(r'<style>(.*?)</style>', f.read(), re.S)
    with open(PAGE_PATH) as f:
        page = f.read().replace('/* the agents\' page style */',
                                agent_style.group(1).strip())
    scripts = re.findall(r'<script>(.*?)</script>', page, re.S)
    styles = re.findall(r'<style>(.*?)</style>', page, re.S)
    policy = ("default-src 'none'; connect-src 'self'; img-src 'self';"
              " script-src %s; style-src %s; frame-ancestors 'none';"
              " base-uri 'none'; form-action 'none'" % (
                  ' '.join(_csp_hash(s) for s in scripts),
                  ' '.join(_csp_hash(s) for s in styles)))
    return page, policy


class _Handler(RouteHandler):
    routes = ROUTES

    def end_headers(self):
        portal = self.server.api
        self.send_header('X-Content-Type-Options', 'nosniff')
        self.send_header('X-Frame-Options', 'DENY')
        self.send_header('Referrer-Policy', 'no-referrer')
        self.send_header('Content-Security-Policy', portal.policy)
        super().end_headers()

    def _query(self):
        query = urlsplit(self.path).query
        try:
            fields = parse_qs(query, strict_parsing=bool(query),
                              errors='strict')
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, 'query string: %s' % one_line(e))
        for key in fields:
            if key not in FILTER_KEYS:
                raise ApiError(400, 'unknown query parameter %s (known: %s)'
                               % (cut(key), ', '.join(FILTER_KEYS)))
        return {k: [w for v in values for w in v.split(',') if w]
                for k, values in fields.items()}

    def _same_origin(self):
        """A browser's POST must come from the portal's own page."""
        origin = self.headers.get('Origin')
        if origin is None:
            return   # not a browser's cross-site request
        host = self.headers.get('Host', '')
        if origin == 'null' or urlsplit(origin).netloc != host:
            raise ApiError(403, 'a request from another site (Origin %s)'
                           ' is refused' % one_line(origin, 80))

    # -- routes ---------------------------------------------------------------

    def _route_page(self, who, params, raw):
        return 200, Text(self.server.api.page, 'text/html; charset=utf-8')

    # /openapi.json and /api/whoami: the agents' API's own handlers.

    def _route_view(self, who, params, raw):
        portal = self.server.api
        return 200, portal.view(who, portal.filters(self._query()))

    def _route_cluster(self, who, params, raw):
        return 200, self.server.api.cluster(who, params['cluster'])

    def _route_service(self, who, params, raw):
        return 200, self.server.api.service(who, params['cluster'],
                                            params['name'])

    def _route_action(self, who, params, raw):
        ctype = (self.headers.get('Content-Type') or '').split(';')[0]
        if ctype.strip().lower() != 'application/json':
            raise ApiError(415, 'the body must be application/json (got %s)'
                           % (cut(ctype) if ctype else 'none'))
        self._same_origin()
        if params['action'] not in ACTIONS:
            raise ApiError(404, 'unknown action %s (actions: %s)' % (
                cut(params['action']), ', '.join(ACTIONS)))
        body = parse_body(raw, ACTION_FIELDS)
        return 200, self.server.api.act(who, params['cluster'],
                                        params['name'], params['action'],
                                        body)

    def _route_events(self, who, params, raw):
        portal = self.server.api
        filters = portal.filters(self._query())
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        try:
            portal.stream(who, filters, self.wfile.write)
        except OSError as e:   # the browser left
            logger.debug('portal: %s: event stream: %s', who, e)
        return None


class _Server(_ApiServer):
    name = 'portal'


class Portal(object):
    """The portal of ``config`` (a PortalConfig): one feed per cluster and
    the HTTPS server. ``port`` 0 takes a free one (see :attr:`url`)."""

    def __init__(self, config, port=None):
        self.config = config
        self.settings = config.portal
        self.listen = self.settings.listen
        self.port = self.settings.port if port is None else port
        self.feeds = OrderedDict(
            (name, ClusterFeed(conf, self.settings, self._changed))
            for name, conf in config.clusters.items())
        self.server = None
        self.context = None
        self.revocations = None
        self._closing = threading.Event()
        self._cond = threading.Condition()
        self._version = 0
        with open(OPENAPI_PATH) as f:
            self.openapi = json.load(f)
        self.page, self.policy = load_page()

    # -- life cycle -----------------------------------------------------------

    def _context(self):
        ca, cert, key, crl = self.config.files()
        try:
            ctx = server_context(ca, cert, key)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(self.config.path, 'portal', 'ssl_dir',
                              'cannot use %s, %s and %s: %s'
                              % (ca, cert, key, one_line(e)))
        self.revocations = pki.Revocations(crl, pki.load_cert(ca))
        return ctx

    def start(self):
        self.context = self._context()
        try:
            self.server = _Server((self.listen, self.port), _Handler, Limits(
                self.settings.max_connections,
                self.settings.max_client_connections,
                self.settings.client_timeout))
        except OSError as e:
            raise ConfigError(self.config.path, 'portal', 'port', 'cannot'
                              ' listen on %s port %d: %s' % (
                                  self.listen, self.port, e.strerror or e))
        self.server.api = self
        self.port = self.server.server_address[1]
        self._closing.clear()
        for feed in self.feeds.values():
            feed.start()
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name='portal-https').start()
        logger.info('portal: %s on %s (clients with certificates of %s),'
                    ' %d cluster(s): %s', self.settings.name, self.url,
                    self.config.files()[0], len(self.feeds),
                    ' '.join(self.feeds))
        return self

    @property
    def url(self):
        host = '[%s]' % self.listen if ':' in self.listen else self.listen
        return 'https://%s:%d' % (host, self.port)

    def stop(self):
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for feed in self.feeds.values():
            feed.stop()

    # -- who is asking --------------------------------------------------------

    def identify(self, conn):
        who = identify_peer(conn, self.revocations)
        if who.role == pki.HOST_ROLE:
            raise ApiError(403, 'a host certificate (%s): the portal\'s own'
                           ' kind, not a user\'s' % who.name)
        return who

    # -- news -----------------------------------------------------------------

    def _changed(self):
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wait_change(self, version, timeout):
        """The version of the news after ``version``, or the same one after
        ``timeout`` seconds without news."""
        with self._cond:
            if self._version == version and not self._closing.is_set():
                self._cond.wait(timeout)
            return self._version

    # -- the view -------------------------------------------------------------

    def _feed(self, name):
        feed = self.feeds.get(name)
        if feed is None:
            raise ApiError(404, 'no cluster %r (clusters: %s)' % (
                name[:63], ', '.join(self.feeds)))
        return feed

    def filters(self, query):
        """Filters from a query ({key: [words]}); ApiError 400 for a name
        the portal does not know."""
        known = {
            'cluster': list(self.feeds),
            'site': sorted(set(f.site for f in self.feeds.values())),
            'state': list(CLUSTER_STATES + SERVICE_STATES),
        }
        for key, words in query.items():
            for word in words:
                if word not in known[key]:
                    raise ApiError(400, 'no %s %r (%ss: %s)' % (
                        key, word[:63], key, ', '.join(known[key])
                        or 'none'))
        return Filters(query.get('cluster', ()), query.get('site', ()),
                       query.get('state', ()))

    def _clusters(self, who):
        may_act = 'act' in PERMISSIONS[who.role]
        return [cluster_view(feed.snapshot(), self.settings.history_kept,
                             may_act) for feed in self.feeds.values()]

    def view(self, who, filters=Filters()):
        clusters = self._clusters(who)
        return {
            'portal': self.settings.name,
            'user': {'name': who.name, 'role': who.role,
                     'may_act': 'act' in PERMISSIONS[who.role]},
            'filters': filters.as_dict(),
            'all': {'clusters': [c['name'] for c in clusters],
                    'sites': sorted(set(c['site'] for c in clusters)),
                    'states': list(CLUSTER_STATES + SERVICE_STATES)},
            'clusters': select(clusters, filters),
        }

    def cluster(self, who, name):
        feed = self._feed(name)
        return cluster_view(feed.snapshot(), self.settings.history_kept,
                            'act' in PERMISSIONS[who.role])

    def _service(self, feed, name):
        snap = feed.snapshot()
        services = (snap['status'] or {}).get('services')
        if not isinstance(services, dict) or name not in services:
            raise ApiError(404, 'no service %r in cluster %s (services: %s)'
                           % (name[:63], feed.name,
                              ', '.join(sorted(services or ())) or 'none'
                              if snap['status'] else 'not known yet'))
        return snap, services[name]

    def service(self, who, cluster, name):
        """A service's page: the service, its cluster, its takeovers and
        switches, and the decisions about it of each agent that answers."""
        feed = self._feed(cluster)
        snap, _ = self._service(feed, name)
        # The service as the same snapshot shows it.
        entry = cluster_view(snap, self.settings.history_kept,
                             'act' in PERMISSIONS[who.role])
        service = [s for s in entry['services'] if s['name'] == name][0]
        decisions, errors = feed.decisions(name)
        history = feed.history_now() or []
        return {
            'cluster': {k: entry[k] for k in (
                'name', 'site', 'state', 'problems', 'may_act', 'seen',
                'via', 'error')},
            'service': service,
            'history': [e for e in history if e.get('service') == name],
            'decisions': decisions[-DECISIONS_SHOWN:],
            'unanswered': errors,
        }

    def stream(self, who, filters, write):
        """Write the view as server-sent events: now, then at each change;
        a comment when nothing changed for ``keepalive`` seconds."""
        keepalive = self.settings.keepalive
        sent = None
        version = self.wait_change(None, 0)
        number = 0
        last_write = time.monotonic()
        logger.info('portal: %s: event stream opened', who)
        try:
            while not self._closing.is_set():
                text = json.dumps(self.view(who, filters), sort_keys=True,
                                  default=str)
                if text != sent:
                    number += 1
                    write(('id: %d\nevent: view\ndata: %s\n\n'
                           % (number, text)).encode())
                    sent = text
                    last_write = time.monotonic()
                elif time.monotonic() - last_write >= keepalive:
                    write(b': keepalive\n\n')
                    last_write = time.monotonic()
                self._closing.wait(EVENTS_MIN_INTERVAL)
                version = self.wait_change(version, max(
                    0.1, keepalive - (time.monotonic() - last_write)))
        finally:
            logger.info('portal: %s: event stream closed', who)

    # -- actions --------------------------------------------------------------

    def act(self, who, cluster, name, verb, body):
        """Relay an operator's action to the cluster; the agent's message."""
        feed = self._feed(cluster)
        snap, svc = self._service(feed, name)
        if not certificate_may_act(snap['whoami'], snap['cert_role']):
            raise ApiError(403, 'the portal\'s certificate for cluster %s'
                           ' (role %s) may not act there' % (
                               cluster, (snap['whoami'] or {}).get('role')
                               or snap['cert_role']))
        if snap['unreachable']:
            raise ApiError(503, 'cluster %s does not answer: %s'
                           % (cluster, snap['unreachable']))
        to = body.get('to')
        if verb in ('switch', 'takeover') and not to:
            raise ApiError(400, '%s needs the host to move %s to ("to")'
                           % (verb, name))
        if to is not None and to not in (svc.get('hosts') or ()):
            raise ApiError(400, '%s cannot run on %r: its hosts are %s' % (
                name, to[:63], ' '.join(svc.get('hosts') or ())))
        token = body.get('token')
        if token is not None and token != svc.get('token'):
            raise ApiError(409, '%s changed since you confirmed: it is %s'
                           ' now (you saw token %s)' % (
                               name, 'on %s with token %s' % (
                                   svc['owner'], svc['token'])
                               if svc.get('owner') else 'stopped', token))
        what = '%s %s on %s%s' % (verb, name, cluster,
                                  ' to %s' % to if to else '')
        try:
            url, message = feed.act(name, verb, to, bool(body.get('force')),
                                    behalf=who.name, at=body.get('at'))
        except ApiRefused as e:
            logger.info('portal: %s: %s: refused: %s', who, what, e.message)
            status = e.status if e.status in (400, 404, 409) else 502
            raise ApiError(status, 'cluster %s: %s' % (cluster, e.message))
        except ApiUnreachable as e:
            logger.info('portal: %s: %s: %s', who, what, e)
            raise ApiError(503, 'cluster %s: %s' % (cluster, one_line(e)))
        logger.info('portal: %s: %s: %s', who, what, message)
        return {'cluster': cluster, 'service': name, 'action': verb,
                'to': to, 'via': url, 'message': message}
