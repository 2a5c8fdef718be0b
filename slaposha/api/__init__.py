"""The agent's API: one set of routes (:mod:`slaposha.api.routes`), served
on a local unix socket (:mod:`slaposha.api.local`, for the ``slaposha`` CLI
on the same host) and over HTTPS (:mod:`slaposha.api.https`); the HTTP
layer under both (:mod:`slaposha.api.server`), the plain-HTTP health port
(:mod:`slaposha.api.health`) and the HTTPS client
(:mod:`slaposha.api.client`).

Here: what a request to act on a service may say, and the one-line error
every route answers with a 4xx status; the agent never stops on a bad
request.
"""

import re

from slaposha.inputs import InputError, cut, loads
from slaposha.schema import NAME_RE

__all__ = ['ApiError', 'ACTIONS', 'ACTION_FIELDS', 'MAX_BODY', 'parse_body']

ACTIONS = ('start', 'stop', 'switch', 'takeover', 'freeze', 'thaw',
           'restore')
ACTION_FIELDS = {'to': str, 'by': str, 'force': bool, 'at': str}
MAX_AT = 64     # characters of a restore's time or snapshot name
# Who a relay (the portal) acts for: a name the history shows after the
# relay's own (the HTTPS API's 'for'); never trusted for permissions.
ON_BEHALF = re.compile(r'^[A-Za-z0-9_.@ -]{1,64}$')
MAX_BODY = 64 * 1024
MAX_BY = 200    # characters of who acts, as a peer relays it


class ApiError(Exception):
    def __init__(self, status, message):
        self.status = status
        super().__init__(message)


_TYPE_NAMES = {bool: 'boolean', str: 'string', int: 'whole number'}


def parse_body(raw, fields=ACTION_FIELDS):
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
