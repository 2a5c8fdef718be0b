"""The agent's API: one set of routes, served on a local unix socket (for
the ``slaposha`` CLI on the same host) and later over HTTPS.

Routes (JSON in, JSON out):

- ``GET /status``: the cluster as etcd knows it, and this agent's view;
- ``GET /local``: this agent's view only (works without etcd);
- ``GET /decisions``: every decision of this agent, oldest first;
- ``GET /history``: the takeovers and switches kept in etcd
  (:mod:`slaposha.history`);
- ``POST /services/<name>/<action>``: start, stop, switch, takeover,
  freeze, thaw, restore; body ``{"to": host}`` for switch and start,
  ``{"at": time or snapshot}`` for restore.

Errors are ``{"error": "<one line>"}`` with a 4xx status; the agent never
stops on a bad request.
"""

import re

from slaposha.config import NAME_RE
from slaposha.inputs import InputError, cut, loads, one_line

__all__ = ['dispatch', 'ACTIONS', 'MAX_BODY']

ACTIONS = ('start', 'stop', 'switch', 'takeover', 'freeze', 'thaw',
           'restore')
ACTION_FIELDS = {'to': str, 'by': str, 'force': bool, 'at': str}
MAX_AT = 64     # characters of a restore's time or snapshot name
# Who a relay (the portal) acts for: a name the history shows after the
# relay's own (the HTTPS API's 'for'); never trusted for permissions.
ON_BEHALF = re.compile(r'^[A-Za-z0-9_.@ -]{1,64}$')
MAX_BODY = 64 * 1024
MAX_BY = 200    # characters of who acts, as a peer relays it

_SERVICE_ACTION = re.compile(r'^/services/([A-Za-z0-9_.-]{1,63})/([a-z]+)$')


class ApiError(Exception):
    def __init__(self, status, message):
        self.status = status
        super().__init__(message)


_TYPE_NAMES = {bool: 'boolean', str: 'string', int: 'whole number'}


def _body(raw, fields=ACTION_FIELDS):
    """The JSON object of a request body, each field one of ``fields``
    ({name: type}) or null; ApiError 400 otherwise."""
    if not raw:
        return {}
    try:
        body = loads(raw, MAX_BODY, 'body')
    except InputError as e:
        raise ApiError(400, str(e))
    for key, value in body.items():
        if key not in fields:
            raise ApiError(400, 'unknown field %s (known: %s)'
                           % (cut(key), ', '.join(fields)))
        kind = fields[key]
        if value is not None and (not isinstance(value, kind) or (
                kind is int and isinstance(value, bool))):
            raise ApiError(400, 'field %r must be a %s'
                           % (key, _TYPE_NAMES[kind]))
    to, by = body.get('to'), body.get('by')
    if to is not None and not NAME_RE.fullmatch(to):
        raise ApiError(400, 'field \'to\' must be a host name (got %s)'
                       % cut(to))
    at = body.get('at')
    if at is not None and (len(at) > MAX_AT or not at.isprintable()):
        raise ApiError(400, 'field \'at\' must be a time or a snapshot'
                       ' name, printable, at most %d characters (got %s)'
                       % (MAX_AT, cut(at)))
    if by is not None and (len(by) > MAX_BY or not by.isprintable()):
        raise ApiError(400, 'field \'by\' must be printable, at most %d'
                       ' characters (got %s)' % (MAX_BY, cut(by)))
    return body


def dispatch(agent, method, path, raw_body=b''):
    """(HTTP status, JSON-able answer) for one request."""
    from slaposha.actions import ActionError
    try:
        if path == '/status' and method == 'GET':
            return 200, agent.cluster_status()
        if path == '/local' and method == 'GET':
            return 200, agent.local_status()
        if path == '/decisions' and method == 'GET':
            return 200, {'host': agent.host,
                         'decisions': list(agent.decision_log)}
        if path == '/history' and method == 'GET':
            from slaposha.cluster.etcd import EtcdError
            try:
                return 200, {'host': agent.host, 'history': agent.history()}
            except EtcdError as e:
                raise ApiError(503, 'cannot read the history from etcd: %s'
                               % one_line(e))
        m = _SERVICE_ACTION.match(path)
        if m:
            if method != 'POST':
                raise ApiError(405, 'use POST for actions')
            name, verb = m.groups()
            if verb not in ACTIONS:
                raise ApiError(404, 'unknown action %s (actions: %s)'
                               % (cut(verb), ', '.join(ACTIONS)))
            body = _body(raw_body)
            try:
                return 200, {'message': agent.action(name, verb, body)}
            except ActionError as e:
                status = 404 if str(e).startswith('no service') else 409
                raise ApiError(status, str(e))
        raise ApiError(404, 'no such route: %s %s' % (cut(method),
                                                      cut(path)))
    except ApiError as e:
        return e.status, {'error': str(e)}
