"""A client of the agent's HTTPS API (:mod:`slaposha.api.https`), with
``requests``: for the ``slaposha`` CLI and the ``slapos ha`` commands.

Which certificate it shows, first found:

- the files given (``cert``, ``key``, ``ca``; the CLI's ``--cert``,
  ``--key``, ``--ca`` flags);
- ``$SLAPOSHA_CERT_DIR``, else ``~/.slaposha``: ``operator.crt``,
  ``operator.key`` and ``ca.crt``, as ``slaposha cert issue`` or ``cert
  install`` leave them;
- on a host, :meth:`ApiClient.for_host` shows the host's own certificate
  (``<host>.crt`` in ``ssl_dir``, role host).

Every failure is one line: :class:`ApiUnreachable` (no answer, TLS refused,
missing files), :class:`ApiRefused` (the agent answered 4xx or 5xx; its
``status`` and one-line ``message``).
"""

import json
import os
import re

import requests

from slaposha import pki
from slaposha.inputs import loads, one_line

__all__ = ['ApiClient', 'ApiError', 'ApiUnreachable', 'ApiRefused',
           'default_files', 'url_for']

# An agent's event (its whole cluster status) is read within this.
MAX_EVENT = 16 << 20


class ApiError(Exception):
    """A failure to get an answer from the API, as one line."""


class ApiUnreachable(ApiError):
    pass


class ApiRefused(ApiError):
    def __init__(self, status, message):
        self.status = status
        self.message = message
        super().__init__('%d: %s' % (status, message))


def default_files(folder=None):
    """(cert, key, ca) in ``folder``, ``$SLAPOSHA_CERT_DIR`` or
    ``~/.slaposha``."""
    folder = os.path.expanduser(folder or os.environ.get('SLAPOSHA_CERT_DIR')
                                or pki.OPERATOR_DIR)
    return tuple(os.path.join(folder, n)
                 for n in ('operator.crt', 'operator.key', 'ca.crt'))


def url_for(cluster, host):
    """The API URL of ``host`` of ``cluster`` (its address: what its
    certificate names)."""
    listen = cluster.api.listen
    if not listen or listen in ('0.0.0.0', '::'):
        listen = cluster.hosts[host].address
    if ':' in listen:
        listen = '[%s]' % listen
    return 'https://%s:%d' % (listen, cluster.api.port)


class ApiClient(object):

    def __init__(self, url, cert=None, key=None, ca=None, timeout=30.0):
        defaults = default_files()
        self.url = url.rstrip('/')
        self.cert = cert or defaults[0]
        self.key = key or defaults[1]
        self.ca = ca or defaults[2]
        self.timeout = timeout
        for path, what, hint in (
                (self.cert, 'client certificate', '--cert'),
                (self.key, 'client key', '--key'),
                (self.ca, 'cluster CA certificate', '--ca')):
            if not os.access(path, os.R_OK):
                raise ApiUnreachable(
                    '%s: no %s (give %s, or see `slaposha cert issue`)'
                    % (path, what, hint))
        self.session = requests.Session()
        self.session.cert = (self.cert, self.key)
        self.session.verify = self.ca

    @classmethod
    def for_host(cls, cluster, host, target=None, **kwargs):
        """The API of ``target`` (default: ``host`` itself) with the
        certificate of ``host``."""
        d = cluster.ssl_dir
        return cls(url_for(cluster, target or host),
                   cert=os.path.join(d, host + '.crt'),
                   key=os.path.join(d, host + '.key'),
                   ca=os.path.join(d, 'ca.crt'), **kwargs)

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests -------------------------------------------------------------

    def _send(self, method, route, body=None, stream=False, timeout=None):
        # verify and cert per request: a session's verify loses to
        # $REQUESTS_CA_BUNDLE (requests merges the environment first).
        kwargs = dict(timeout=timeout or self.timeout, stream=stream,
                      verify=self.ca, cert=(self.cert, self.key))
        if body is not None:
            kwargs['data'] = json.dumps(body).encode()
            kwargs['headers'] = {'Content-Type': 'application/json'}
        try:
            response = self.session.request(method, self.url + route,
                                            **kwargs)
        except requests.exceptions.SSLError as e:
            raise ApiUnreachable('%s: TLS refused (a certificate of another'
                                 ' CA, expired, or not for this host?): %s'
                                 % (self.url, _reason(e)))
        except requests.exceptions.RequestException as e:
            raise ApiUnreachable('%s: no answer: %s'
                                 % (self.url, _reason(e)))
        if response.status_code >= 400:
            try:
                message = response.json()['error']
            except (ValueError, KeyError, TypeError):
                message = one_line(response.text[:200]) or response.reason
            response.close()
            raise ApiRefused(response.status_code, message)
        return response

    def request(self, method, route, body=None):
        """The JSON answer of one request."""
        response = self._send(method, route, body)
        try:
            return response.json()
        except ValueError:
            raise ApiUnreachable('%s%s: the answer is not JSON'
                                 % (self.url, route))

    def whoami(self):
        return self.request('GET', '/whoami')

    def status(self):
        return self.request('GET', '/status')

    def local(self):
        return self.request('GET', '/local')

    def services(self):
        return self.request('GET', '/services')

    def service(self, name):
        return self.request('GET', '/services/%s' % name)

    def action(self, name, verb, to=None):
        """The agent's one-line message; ApiRefused when it cannot."""
        body = {'to': to} if to else {}
        return self.request('POST', '/services/%s/%s' % (name, verb),
                            body)['message']

    def decisions(self):
        return self.request('GET', '/decisions')['decisions']

    def config(self):
        return self.request('GET', '/config')

    def openapi(self):
        return self.request('GET', '/openapi.json')

    def events(self, timeout=None):
        """Yield (event, data) of the server-sent events stream until it
        ends; ``timeout`` bounds the wait for each line (the server sends a
        comment every 15 s)."""
        response = self._send('GET', '/events', stream=True,
                              timeout=timeout or 60.0)
        event, data = 'message', []
        try:
            for line in _lines(response):
                if line == '':
                    if data:
                        text = '\n'.join(data)
                        try:
                            yield event, loads(text, MAX_EVENT, 'event',
                                               require=None)
                        except ValueError:
                            yield event, text
                    event, data = 'message', []
                elif line.startswith(':'):
                    continue
                else:
                    field, _, value = line.partition(':')
                    value = value[1:] if value.startswith(' ') else value
                    if field == 'event':
                        event = value
                    elif field == 'data':
                        data.append(value)
        except requests.exceptions.RequestException as e:
            raise ApiUnreachable('%s/events: %s' % (self.url, _reason(e)))
        finally:
            response.close()


def _lines(response):
    """The lines of a streamed answer as soon as each arrives (requests'
    iter_lines waits for a whole chunk)."""
    raw = response.raw
    read1 = getattr(raw, 'read1', None)
    if read1 is None:  # urllib3 1.x
        read1 = raw._fp.read1
    pending = b''
    while True:
        try:
            chunk = read1(65536)
        except Exception as e:
            # urllib3 raises its own errors; make them requests' ones.
            raise requests.exceptions.ConnectionError(e)
        if not chunk:
            break
        pending += chunk
        while b'\n' in pending:
            line, pending = pending.split(b'\n', 1)
            yield line.rstrip(b'\r').decode('utf-8', 'replace')
    if pending:
        yield pending.decode('utf-8', 'replace')


# What matters in a requests error, under urllib3's wrapping ("HTTPSConnection
# Pool(host=..., port=...): Max retries exceeded with url: ... (Caused by
# NewConnectionError(...: [Errno 111] Connection refused))").
_REASON = re.compile(r"\[Errno -?\d+\] [^'\"()]+|Read timed out|Connection to"
                     r" \S+ timed out|certificate verify failed[^'\"()]*|"
                     r"\[SSL: [A-Z_]+\] [^\"()]+|Connection reset by peer|"
                     r"Remote end closed connection without response")


def _reason(error):
    text = one_line(error, 1000)
    found = _REASON.search(text)
    return found.group(0).strip(' .') if found else text
