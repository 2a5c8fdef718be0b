"""The HTTPS API (mutual TLS, roles, bad input, events, OpenAPI and a fuzz
run from it) and the cluster's PKI (``slaposha cluster init|join``,
``slaposha cert ...``).

The API runs on 127.0.0.1 with a stand-in agent (FakeAgent, with the
names the API calls on the real one): the real agent needs etcd, and what
is tested here is the API in front of it; the agent's own actions and
status are tested with real etcd in test_agent.py. The unix socket serves
the same routes to root.
"""

import datetime
import json
import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from slaposha import config, pki
from slaposha.actions import ActionError
from slaposha.api import ACTIONS, MAX_BODY
from slaposha.api.client import ApiClient, ApiRefused, ApiUnreachable
from slaposha.api.https import HttpsApi
from slaposha.api.local import LocalApi, call
from slaposha.api.routes import OPENAPI_PATH, ROUTES
from slaposha.api.server import limits_of
from slaposha.cli.main import main
from slaposha.metrics import Metrics

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)

ROLES = ('guest', 'operator', 'admin', 'root', 'host')


class FakeAgent(object):
    """What the API asks of an agent, without etcd: two services whose
    owner and last decision the tests change."""

    def __init__(self, cluster=None):
        self.cluster = cluster
        self.host = 'hA'
        self.confs = {}
        self.slots = {}
        self.metrics = Metrics()
        self.lock = threading.Lock()
        self.calls = []
        self.owner = {'web': 'hA', 'db': None}
        self.decision = {'web': [time.time(), 'start', 'preferred host'],
                         'db': None}
        self.decision_log = []

    def set(self, name, owner, action, reason):
        with self.lock:
            self.owner[name] = owner
            self.decision[name] = [time.time(), action, reason]
            self.decision_log.append({'service': name, 'time': time.time(),
                                      'action': action, 'reason': reason})

    def history(self):
        return []

    def _service(self, name):
        return {'state': 'running' if self.owner[name] == 'hA'
                else 'stopped', 'owner': self.owner[name],
                'token': 7 if self.owner[name] else None,
                'decision': self.decision[name],
                'resources': [['ip#public', 'up', 'ok']]}

    def local_status(self):
        with self.lock:
            return {'host': 'hA', 'pid': os.getpid(), 'version': 'test',
                    'time': time.time(),
                    'lease': {'id': '1', 'valid': True,
                              'time_left': round(time.time() % 3, 3),
                              'lost': None},
                    'etcd': 'ok',
                    'services': {n: self._service(n) for n in self.owner}}

    def cluster_status(self):
        local = self.local_status()
        with self.lock:
            return {
                'cluster': 'test', 'host': 'hA', 'local': local,
                'etcd': 'ok',
                'hosts': {h: {'alive': True, 'role': 'host'}
                          for h in ('hA', 'hB', 'hC')},
                'services': {n: {
                    'orchestrate': 'ha', 'hosts': ['hA', 'hB'],
                    'owner': self.owner[n],
                    'token': 7 if self.owner[n] else None,
                    'frozen': None, 'target': None, 'switch': None,
                    'resources': [['ip#public', 'up', 'ok']],
                    'on': {'hA': local['services'][n], 'hB': None}}
                    for n in sorted(self.owner)}}

    def action(self, name, verb, params=None):
        params = params or {}
        if name not in self.owner:
            raise ActionError('no service %r (services: %s)'
                              % (name, ', '.join(sorted(self.owner))))
        to = params.get('to')
        if verb == 'switch' and not to:
            raise ActionError('switch needs a host to move to (--to)')
        if to is not None and to not in ('hA', 'hB'):
            raise ActionError('%s cannot run on %r: its hosts are hA hB'
                              % (name, to))
        with self.lock:
            self.calls.append((name, verb, dict(params)))
        return '%s: %s (by %s)' % (name, verb, params.get('by'))


# -- a cluster, its PKI and an API server -------------------------------------

CLUSTER_FILE = """\
[cluster]
name = test
hosts = hA hB hC
ssl_dir = {ssl}
[host hA]
address = 127.0.0.1
[host hB]
address = 127.0.0.2
[host hC]
address = 127.0.0.3
[api]
listen = 127.0.0.1
"""


def write_cluster(folder, ssl_dir=None):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'cluster.cfg')
    with open(path, 'w') as f:
        f.write(CLUSTER_FILE.format(ssl=ssl_dir or os.path.join(folder,
                                                                'ssl')))
    return path


def make_pair(folder, stem, ca_key, ca_cert, name, role, address=None,
              **kwargs):
    key = pki.new_key()
    cert = pki.issue(ca_key, ca_cert, key.public_key(), name, role,
                     address=address, **kwargs)
    pki.write_key(os.path.join(folder, stem + '.key'), key)
    pki.write_cert(os.path.join(folder, stem + '.crt'), cert)
    return (os.path.join(folder, stem + '.crt'),
            os.path.join(folder, stem + '.key'))


def no_role_certificate(folder, ca_key, ca_cert):
    """Signed by the cluster CA but with no role (as the lab's openssl PKI
    makes them)."""
    key = pki.new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(
                NameOID.COMMON_NAME, 'nobody')]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    pki.write_key(os.path.join(folder, 'norole.key'), key)
    pki.write_cert(os.path.join(folder, 'norole.crt'), cert)
    return os.path.join(folder, 'norole.crt'), os.path.join(folder,
                                                            'norole.key')


class Env(object):
    """The server and a certificate per kind of client."""

    def __init__(self, folder):
        self.folder = folder
        ssl_dir = os.path.join(folder, 'ssl')
        clients = os.path.join(folder, 'clients')
        os.makedirs(ssl_dir)
        os.makedirs(clients)
        self.cluster = config.load_cluster(write_cluster(folder))
        self.ca_key, self.ca_cert = pki.create_ca('test')
        self.ca = pki.write_cert(os.path.join(ssl_dir, 'ca.crt'),
                                 self.ca_cert)
        pki.write_key(os.path.join(folder, 'ca.key'), self.ca_key)
        self.crl = os.path.join(ssl_dir, 'crl.pem')
        pki.write_crl(self.crl, pki.empty_crl(self.ca_key, self.ca_cert))
        make_pair(ssl_dir, 'hA', self.ca_key, self.ca_cert, 'hA', 'host',
                  '127.0.0.1')
        self.certs = {}
        for role in ('guest', 'operator', 'admin', 'root'):
            self.certs[role] = make_pair(clients, role, self.ca_key,
                                         self.ca_cert, 'alice-' + role, role)
        self.certs['host'] = make_pair(clients, 'hB', self.ca_key,
                                       self.ca_cert, 'hB', 'host',
                                       '127.0.0.2')
        self.certs['revoked'] = make_pair(clients, 'hC', self.ca_key,
                                          self.ca_cert, 'hC', 'host',
                                          '127.0.0.3')
        self.certs['stranger-host'] = make_pair(
            clients, 'hZ', self.ca_key, self.ca_cert, 'hZ', 'host',
            '127.0.0.9')
        self.certs['expired'] = make_pair(
            clients, 'expired', self.ca_key, self.ca_cert, 'old', 'root',
            days=1, valid_from=datetime.datetime.now(
                datetime.timezone.utc) - datetime.timedelta(days=3))
        self.certs['no-role'] = no_role_certificate(clients, self.ca_key,
                                                    self.ca_cert)
        other_key, other_ca = pki.create_ca('test')  # same name, other key
        self.certs['other-ca'] = make_pair(clients, 'other', other_key,
                                           other_ca, 'alice-root', 'root')
        self.agent = FakeAgent(self.cluster)
        self.api = HttpsApi(self.agent, self.cluster, 'hA', port=0).start()
        self.url = self.api.url

    def request(self, who, method, route, **kwargs):
        kwargs.setdefault('timeout', 10)
        return requests.request(method, self.url + route,
                                cert=self.certs[who], verify=self.ca,
                                **kwargs)

    def raw(self, who, data, read_all=True):
        """Send raw bytes over TLS; the raw answer."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(*self.certs[who])
        with socket.create_connection(('127.0.0.1', self.api.port),
                                      timeout=10) as sock:
            with ctx.wrap_socket(sock, server_hostname='127.0.0.1') as tls:
                tls.sendall(data)
                chunks = []
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        return b''.join(chunks)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    env = Env(str(tmp_path_factory.mktemp('api')))
    try:
        yield env
    finally:
        env.api.stop()


def one_line_error(response):
    assert response.headers['Content-Type'] == 'application/json'
    text = response.text.strip()
    assert '\n' not in text, text
    answer = json.loads(text)
    assert list(answer) == ['error'] and answer['error'].strip(), answer
    return answer['error']


def still_serving(env):
    assert env.request('root', 'GET', '/whoami').status_code == 200


# -- who may connect ----------------------------------------------------------

def test_no_client_certificate_is_refused(env):
    calls = len(env.agent.calls)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(env.url + '/services/web/stop', json={},
                      verify=env.ca, timeout=10)
    assert len(env.agent.calls) == calls
    still_serving(env)


def test_certificate_of_another_ca_is_refused(env):
    calls = len(env.agent.calls)
    with pytest.raises(requests.exceptions.ConnectionError):
        env.request('other-ca', 'POST', '/services/web/stop', json={})
    assert len(env.agent.calls) == calls
    still_serving(env)


def test_expired_certificate_is_refused(env):
    facts = pki.describe(pki.load_cert(env.certs['expired'][0]))
    assert facts['expired'] and facts['role'] == 'root'
    with pytest.raises(requests.exceptions.ConnectionError):
        env.request('expired', 'GET', '/status')
    still_serving(env)


def test_revoked_certificate_is_refused(env):
    cert = pki.load_cert(env.certs['revoked'][0])
    assert env.request('revoked', 'GET', '/whoami').status_code == 200
    pki.revoke(env.ca_key, env.ca_cert, env.crl, [cert.serial_number])
    # The server reads the list again when it changes: no restart.
    for method, route in (('GET', '/whoami'), ('GET', '/status'),
                          ('POST', '/services/web/stop')):
        r = env.request('revoked', method, route, json={})
        assert r.status_code == 403
        assert 'revoked' in one_line_error(r)
    assert not any(c[2].get('by') == 'host hC' for c in env.agent.calls)
    still_serving(env)


def test_certificate_without_role_or_of_a_foreign_host_is_refused(env):
    r = env.request('no-role', 'GET', '/status')
    assert r.status_code == 403
    assert 'no slaposha role' in one_line_error(r)
    r = env.request('stranger-host', 'GET', '/status')
    assert r.status_code == 403
    assert 'not a host of this cluster' in one_line_error(r)


def test_server_refuses_a_client_that_never_speaks_without_blocking(env):
    # A connection that never sends its TLS hello holds no other client.
    with socket.create_connection(('127.0.0.1', env.api.port)):
        began = time.monotonic()
        still_serving(env)
        assert time.monotonic() - began < 5


# -- roles --------------------------------------------------------------------

READS = ['/openapi.json', '/whoami', '/status', '/local', '/services',
         '/services/web', '/decisions']
MAY = {
    'guest': {'read'},
    'operator': {'read', 'act'},
    'admin': {'read', 'act', 'config'},
    'root': {'read', 'act', 'config'},
    'host': {'read', 'act', 'config'},
}


@pytest.mark.parametrize('role', ROLES)
def test_each_role_may_what_it_may_and_gets_403_for_the_rest(env, role):
    may = MAY[role]
    for route in READS:
        r = env.request(role, 'GET', route)
        assert r.status_code == 200, (role, route, r.text)
    r = env.request(role, 'GET', '/events', stream=True)
    assert r.status_code == 200 and \
        r.headers['Content-Type'] == 'text/event-stream'
    r.close()
    r = env.request(role, 'GET', '/config')
    if 'config' in may:
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer['cluster']['cluster']['name'] == 'test'
        assert answer['hosts']['hA']['address'] == '127.0.0.1'
    else:
        assert r.status_code == 403
        assert 'needs role admin' in one_line_error(r)
    for verb in ACTIONS:
        before = len(env.agent.calls)
        body = {'to': 'hB'} if verb == 'switch' else {}
        r = env.request(role, 'POST', '/services/web/%s' % verb, json=body)
        if 'act' in may:
            assert r.status_code == 200, (role, verb, r.text)
            name, done, params = env.agent.calls[-1]
            assert (name, done) == ('web', verb)
            # Who acted comes from the certificate.
            cn = pki.cert_name(pki.load_cert(env.certs[role][0]))
            assert params['by'] == '%s %s' % (role, cn)
            assert r.json()['message'].startswith('web: %s' % verb)
        else:
            assert r.status_code == 403, (role, verb, r.text)
            assert 'needs role operator' in one_line_error(r)
            assert len(env.agent.calls) == before
    whoami = env.request(role, 'GET', '/whoami').json()
    assert whoami['role'] == role and set(whoami['may']) == may


def test_who_acts_cannot_be_claimed_in_the_body(env):
    r = env.request('operator', 'POST', '/services/web/stop',
                    json={'by': 'root somebody'})
    assert r.status_code == 400
    assert 'certificate' in one_line_error(r)
    # A host relays an operator's action and says who.
    r = env.request('host', 'POST', '/services/web/freeze',
                    json={'by': 'alice on hB'})
    assert r.status_code == 200
    assert env.agent.calls[-1][2]['by'] == 'alice on hB'
    # A relay (the portal) names the user it acts for, after itself.
    r = env.request('operator', 'POST', '/services/web/freeze',
                    json={'for': 'alice@site-2'})
    assert r.status_code == 200
    cn = pki.cert_name(pki.load_cert(env.certs['operator'][0]))
    assert env.agent.calls[-1][2]['by'] == 'operator %s for alice@site-2' % cn
    calls = len(env.agent.calls)
    for bad in ('', 'x' * 65, 'alice\x1b[31m', 'a/b'):
        r = env.request('operator', 'POST', '/services/web/freeze',
                        json={'for': bad})
        assert r.status_code == 400, bad
        assert "field 'for' must be a name" in one_line_error(r)
    assert len(env.agent.calls) == calls


# -- bad input ----------------------------------------------------------------

def test_bad_input_gets_a_4xx_with_one_line(env):
    def post(route, **kwargs):
        return env.request('operator', 'POST', route, **kwargs)
    calls = len(env.agent.calls)
    cases = [
        (post('/services/web/start', data=b'{"to": ',
              headers={'Content-Type': 'application/json'}), 400, 'JSON'),
        (post('/services/web/start', data=b'\xff\xfe',
              headers={'Content-Type': 'application/json'}), 400, 'JSON'),
        (post('/services/web/start', json={'to': 'hB', 'hurry': True}),
         400, "unknown field 'hurry'"),
        (post('/services/web/switch', json={'to': 'hB', 'force': 'yes'}),
         400, "field 'force' must be a boolean"),
        (post('/services/web/start', json={'to': 5}), 400, 'string'),
        (post('/services/web/start', json=['hB']), 400, 'object'),
        (post('/services/web/start', json='hB'), 400, 'object'),
        (post('/services/web/start',
              data=b'{"to": "' + b'a' * MAX_BODY + b'"}',
              headers={'Content-Type': 'application/json'}), 413, 'larger'),
        (post('/services/web/start', data=b'x' * (1024 * 1024),
              headers={'Content-Type': 'application/json'}), 413, 'larger'),
        (post('/services/web/start', data=b'[' * 3000 + b']' * 3000,
              headers={'Content-Type': 'application/json'}), 400,
         'nests deeper than 32 levels'),
        (post('/services/web/start', data=b'{"force": NaN}',
              headers={'Content-Type': 'application/json'}), 400,
         'NaN is not JSON'),
        (post('/services/web/start', json={'to': 'h' * 5000}), 400,
         "'to' must be a host name"),
        (post('/services/web/start', json={'to': 'hB\n'}), 400,
         "'to' must be a host name"),
        (post('/services/web/start', json={'h' * 5000: 1}), 400,
         '... (5000 characters)'),
        (post('/services/web/start', data=b'to=hB',
              headers={'Content-Type': 'application/x-www-form-urlencoded'}),
         415, 'application/json'),
        (post('/services/nothing/start', json={}), 404, "no service"),
        (post('/services/web/explode', json={}), 404, 'unknown action'),
        (post('/services/web/switch', json={}), 409, 'needs a host'),
        (post('/services/web/start', json={'to': 'hQ'}), 409,
         'cannot run on'),
        (env.request('operator', 'GET', '/services/nothing'), 404,
         'no service'),
        (env.request('operator', 'GET', '/services/web/start'), 405,
         'use POST'),
        (env.request('operator', 'POST', '/status'), 405, 'use GET'),
        (env.request('operator', 'DELETE', '/services/web'), 405, 'use GET'),
        (env.request('operator', 'PATCH', '/nowhere'), 404, 'no such route'),
        (env.request('operator', 'GET', '/nowhere'), 404, 'no such route'),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        error = one_line_error(response)
        assert words in error, (words, response.text)
        assert len(error) < 300, error  # values are cut
    assert len(env.agent.calls) == calls
    still_serving(env)


@pytest.mark.parametrize('data, status', [
    (b'POST /services/web/start HTTP/1.0\r\nContent-Length: abc\r\n\r\n',
     400),
    (b'POST /services/web/start HTTP/1.0\r\nContent-Length: 1_0\r\n\r\n',
     400),
    (b'POST /services/web/start HTTP/1.1\r\nHost: x\r\n'
     b'Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n', 411),
    (b'GARBAGE\r\n\r\n', 400),
    # HTTP/0.9 (no version): its answers would have no status line.
    (b'GET /status\r\n', 400),
    (b'\r\n', 400),
    (b'POST /services/web/stop HTTP/1.0\r\nContent-Length: 2\r\n'
     b'Content-Length: 20\r\n\r\n{}', 400),
    (b'GET /status HTTP/2.0\r\n\r\n', 400),
    (b'GET /' + b'a' * 70000 + b' HTTP/1.0\r\n\r\n', 414),
    (b'GET /status HTTP/1.0\r\n' + b'X-Filler: y\r\n' * 200 + b'\r\n', 431),
])
def test_malformed_http_gets_a_4xx_with_one_line(env, data, status):
    answer = env.raw('operator', data)
    head, _, body = answer.partition(b'\r\n\r\n')
    assert head.split(b' ', 2)[1] == str(status).encode(), answer[:200]
    assert b'application/json' in head
    assert json.loads(body.decode())['error']
    assert b'\n' not in body.strip()
    still_serving(env)


def test_escape_characters_of_a_request_never_reach_the_log(env, caplog):
    caplog.set_level(logging.DEBUG, logger='slaposha.api')
    for data in (b'GET /\x1b[2J\x1b[31mred HTTP/1.0\r\n\r\n',
                 b'\x1b[2J /status HTTP/1.0\r\n\r\n',
                 b'GET /status HTTP/1.0\x1b[31m\r\n\r\n',
                 b'GET /\x1b[31m\r\n'):
        head = env.raw('operator', data).split(b'\r\n', 1)[0]
        assert head.split(b' ')[1] in (b'400', b'404', b'405'), head
    assert '\\x1b[31m' in caplog.text
    assert '\x1b' not in caplog.text


def test_trickling_guests_never_lock_operators_out(env, tmp_path):
    """64 clients with one guest certificate that trickle a header byte
    every half second: eight of them (max_client_connections) hold a
    connection until request_timeout, the others are answered 429 at
    once, and an operator is served all along. Before, the 64 held every
    slot as long as they trickled."""
    folder = str(tmp_path)
    path = write_cluster(folder, ssl_dir=os.path.dirname(env.ca))
    with open(path, 'a') as f:
        f.write('request_timeout = 2s\n')
    cluster = config.load_cluster(path)
    assert (cluster.api.max_connections,
            cluster.api.max_client_connections) == (64, 8)
    api = HttpsApi(FakeAgent(), cluster, 'hA', port=0).start()
    ctx = ssl.create_default_context(cafile=env.ca)
    ctx.load_cert_chain(*env.certs['guest'])
    guests, began = [], []
    try:
        for _ in range(64):
            began.append(time.monotonic())
            sock = socket.create_connection(('127.0.0.1', api.port), 10)
            guests.append(ctx.wrap_socket(sock,
                                          server_hostname='127.0.0.1'))
        answers = {}
        line = b'GET /status HTTP/1.0\r\nX-Slow: ' + b'a' * 100
        served = None
        for byte in line:
            for i, tls in enumerate(guests):
                if i in answers:
                    continue
                try:
                    tls.sendall(bytes([byte]))
                    tls.settimeout(0.001)
                    answer = tls.recv(4096)
                except (socket.timeout, ssl.SSLWantReadError):
                    continue
                except OSError as e:
                    answer = repr(e).encode()
                answers[i] = (answer, time.monotonic() - began[i])
            if served is None:
                r = requests.get(api.url + '/status', cert=env.certs[
                    'operator'], verify=env.ca, timeout=5)
                served = r.status_code
            if len(answers) == len(guests):
                break
            time.sleep(0.5)
        assert served == 200
        codes = sorted(a.split(b' ', 2)[1] for a, _ in answers.values())
        assert codes == [b'408'] * 8 + [b'429'] * 56, codes
        late = [t for a, t in answers.values() if b' 408 ' in a]
        assert all(1.5 < t < 5 for t in late), late
    finally:
        for tls in guests:
            tls.close()
        api.stop()


# -- events and decisions -----------------------------------------------------

def test_event_stream_sends_each_change_and_ends_when_the_client_leaves(env):
    client = ApiClient(env.url, *env.certs['guest'], ca=env.ca, timeout=10)
    events = client.events(timeout=10)
    kind, first = next(events)
    assert kind == 'status'
    assert first['services']['web']['owner'] == env.agent.owner['web']
    # The clock fields change at each read, without an event.
    env.agent.set('db', 'hA', 'start', 'operator asked')
    began = time.monotonic()
    kind, second = next(events)
    assert kind == 'status'
    assert second['services']['db']['owner'] == 'hA'
    assert time.monotonic() - began < 3
    env.agent.set('db', None, 'stop', 'operator asked')
    kind, third = next(events)
    assert third['services']['db']['owner'] is None
    events.close()
    client.close()
    deadline = time.monotonic() + 5
    while env.api.feed.subscribers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.api.feed.subscribers == 0
    still_serving(env)


def test_decisions_are_the_agents_own_log_oldest_first(env):
    env.agent.set('web', 'hA', 'keep', 'still the preferred host (1)')
    env.agent.set('web', 'hA', 'keep', 'still the preferred host (2)')
    decisions = env.request('guest', 'GET', '/decisions').json()
    reasons = [d['reason'] for d in decisions['decisions']
               if d['service'] == 'web']
    assert reasons[-2:] == ['still the preferred host (1)',
                            'still the preferred host (2)']
    assert decisions['decisions'] == env.agent.decision_log
    assert decisions['host'] == 'hA'


def test_unix_socket_serves_the_same_routes_to_root(env, tmp_path):
    agent = FakeAgent(env.cluster)
    sock = str(tmp_path / 'agent.sock')
    api = LocalApi(agent, sock, limits_of(env.cluster.api)).start()
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        status, whoami = call(sock, 'GET', '/whoami')
        assert status == 200, whoami
        assert whoami['role'] == 'root' and \
            set(whoami['may']) == {'read', 'act', 'config'}
        for route in READS + ['/config', '/history']:
            status, answer = call(sock, 'GET', route)
            assert status == 200, (route, answer)
        agent.set('web', 'hA', 'keep', 'still the preferred host')
        assert call(sock, 'GET', '/decisions')[1]['decisions'] == \
            agent.decision_log
        # Who acts is who the request says (slaposha slapos release does),
        # else the agent names this host's operator.
        by = 'slaposha slapos release on hA'
        status, answer = call(sock, 'POST', '/services/web/freeze',
                              {'by': by})
        assert status == 200, answer
        assert agent.calls[-1] == ('web', 'freeze', {'by': by})
        status, answer = call(sock, 'POST', '/services/web/thaw', {})
        assert status == 200 and agent.calls[-1] == ('web', 'thaw', {})
        for method, route, body, code, words in [
                ('POST', '/services/web/explode', {}, 404, 'unknown action'),
                ('POST', '/services/nothing/start', {}, 404, 'no service'),
                ('POST', '/services/web/switch', {}, 409, 'needs a host'),
                ('POST', '/services/web/start', {'to': 5}, 400, 'string'),
                ('GET', '/services/web/start', None, 405, 'use POST'),
                ('GET', '/nowhere', None, 404, 'no such route')]:
            status, answer = call(sock, method, route, body)
            assert status == code and words in answer['error'], \
                (route, answer)
    finally:
        api.stop()
    assert not os.path.exists(sock)


# -- the OpenAPI description --------------------------------------------------

def spec_routes(spec):
    return {(method.upper(), path) for path, item in spec['paths'].items()
            for method in item if method in ('get', 'post', 'put', 'patch',
                                             'delete', 'head', 'options')}


def test_openapi_file_lists_every_route_and_only_those(env):
    with open(OPENAPI_PATH) as f:
        spec = json.load(f)
    assert spec['openapi'].startswith('3.')
    served = env.request('guest', 'GET', '/openapi.json').json()
    assert served == spec
    assert spec_routes(spec) == {(r.method, r.template) for r in ROUTES}
    # Each route listed answers (not "no such route"), with root.
    for method, path in sorted(spec_routes(spec)):
        route = path.replace('{name}', 'web').replace('{action}', 'freeze')
        r = env.request('root', method, route, json={} if method == 'POST'
                        else None, stream=route == '/events')
        # A health check answers 503 where it fails (the standby check on
        # the owner): an answer too.
        ok = (200, 503) if route.startswith('/health/') else (200,)
        assert r.status_code in ok, (method, route, r.text[:200])
        r.close()
    # Each status code the server answers is documented for the route.
    for path, item in spec['paths'].items():
        for method, op in item.items():
            codes = set(op['responses'])
            assert {'200', '400', '403', '413'} <= codes, (path, method)
            if '{' in path:
                assert '404' in codes


def test_fuzz_from_the_openapi_description_finds_no_5xx(env, caplog):
    """schemathesis generates valid and invalid requests from the served
    description: no 5xx, each answer as described, the server still up."""
    if sys.version_info < (3, 11):
        pytest.skip('schemathesis 4 needs Python 3.11 or newer')
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, negative_data_rejection,
        response_schema_conformance, status_code_conformance)
    caplog.set_level(logging.ERROR, logger='slaposha.api.https')
    spec = env.request('root', 'GET', '/openapi.json').json()
    schema = schemathesis.openapi.from_dict(spec)
    session = requests.Session()
    session.cert = env.certs['root']
    session.verify = env.ca
    checks = [not_a_server_error, status_code_conformance,
              content_type_conformance, response_schema_conformance]
    count = [0]
    calls = len(env.agent.calls)
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == '/events':
            continue  # an endless stream; tested above
        raw = spec['paths'][operation.path][operation.method.lower()]
        params = raw.get('parameters') or []
        body = raw.get('requestBody')
        # Invalid data only where there is something to break; and again
        # with a service that exists, to reach the agent.
        variants = [(GenerationMode.POSITIVE, None)]
        if params or body:
            variants.append((GenerationMode.NEGATIVE, None))
        if '{name}' in operation.path:
            variants.append((GenerationMode.POSITIVE, {'name': 'web'}))
            if body or len(params) > 1:
                variants.append((GenerationMode.NEGATIVE, {'name': 'web'}))
        # The health checks answer 503 by design where they fail (as
        # Patroni's do); the description documents it.
        op_checks = [c for c in checks if c is not not_a_server_error] \
            if operation.path.startswith('/health/') else checks
        for mode, fixed in variants:
            @settings(max_examples=30, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode,
                                              path_parameters=fixed))
            def run(case):
                response = case.call(base_url=env.url, session=session,
                                     verify=env.ca, cert=env.certs['root'],
                                     timeout=10)
                count[0] += 1
                case.validate_response(response, checks=op_checks + (
                    [negative_data_rejection]
                    if mode == GenerationMode.NEGATIVE else []))
            run()
    assert count[0] > 150
    assert len(env.agent.calls) > calls  # valid actions reached the agent
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    still_serving(env)


# -- the client ---------------------------------------------------------------

def test_client_uses_the_operator_files_of_the_default_folder(env, tmp_path,
                                                              monkeypatch):
    folder = tmp_path / 'dot-slaposha'
    folder.mkdir()
    cert, key = env.certs['operator']
    for src, name in ((cert, 'operator.crt'), (key, 'operator.key'),
                      (env.ca, 'ca.crt')):
        with open(src, 'rb') as f:
            (folder / name).write_bytes(f.read())
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('SLAPOSHA_CERT_DIR', raising=False)
    with pytest.raises(ApiUnreachable, match='operator.crt'):
        ApiClient(env.url)
    monkeypatch.setenv('SLAPOSHA_CERT_DIR', str(folder))
    with ApiClient(env.url) as client:
        assert client.whoami()['role'] == 'operator'
        assert client.status()['services']['web']['owner']
        assert client.service('web')['name'] == 'web'
        assert client.action('web', 'thaw').startswith('web: thaw')
        assert client.action('web', 'switch', to='hB') \
            .startswith('web: switch')
        with pytest.raises(ApiRefused) as e:
            client.config()
        assert e.value.status == 403 and 'admin' in e.value.message
        with pytest.raises(ApiRefused) as e:
            client.action('nothing', 'start')
        assert e.value.status == 404
    with pytest.raises(ApiUnreachable, match='TLS refused|no answer'):
        ApiClient(env.url, *env.certs['other-ca'], ca=env.ca).whoami()


def test_client_for_a_host_uses_its_own_certificate(env):
    with ApiClient.for_host(env.cluster, 'hA') as client:
        assert client.url == env.url.rsplit(':', 1)[0] + ':1215'
        client.url = env.url  # the test server is on a free port
        assert client.whoami() == dict(client.whoami(), name='hA',
                                       role='host')


# -- the PKI commands ---------------------------------------------------------

def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cluster_init_creates_the_ca_and_the_first_host(tmp_path, capsys):
    cfg = write_cluster(str(tmp_path))
    ssl_dir = tmp_path / 'ssl'
    code, out, err = run_cli(capsys, '-c', cfg, 'cluster', 'init',
                             '--host', 'hA')
    assert code == 0, err
    for name in ('ca.key', 'hA.key'):
        assert mode(ssl_dir / name) == 0o600
    ca = pki.load_cert(str(ssl_dir / 'ca.crt'))
    cert = pki.load_cert(str(ssl_dir / 'hA.crt'))
    pki.check_issued_by(cert, ca)
    pki.check_key_matches(cert, pki.load_key(str(ssl_dir / 'hA.key')))
    assert pki.cert_role(cert) == 'host' and pki.cert_name(cert) == 'hA'
    san = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == \
        ['127.0.0.1']
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == \
        ['slaposha:role=host']
    assert pki.Revocations(str(ssl_dir / 'crl.pem'), ca).serials() == \
        frozenset()
    # Once only; each mistake is one line and exit code 2.
    for argv in (['cluster', 'init', '--host', 'hA'],
                 ['cluster', 'init', '--host', 'hQ'],
                 ['cert', 'issue', 'bob', '--role', 'king'],
                 ['cert', 'issue', 'bob/../x', '--role', 'guest'],
                 ['cert', 'issue', 'bob', '--role', 'guest', '--days', '0'],
                 ['cert', 'show', str(ssl_dir / 'hA.key')],
                 ['cert', 'sign', str(ssl_dir / 'nothing.csr'), '--role',
                  'host']):
        code, out, err = run_cli(capsys, '-c', cfg, *argv)
        assert code == 2, (argv, out, err)
        assert err.startswith('slaposha: ') and err.count('\n') == 1, err


def test_join_request_sign_install_keys_stay_on_their_host(tmp_path, capsys):
    # Three "machines": hA (init), the CA key's machine, hC (joins).
    ca_store = tmp_path / 'ca-store'
    cfg_a = write_cluster(str(tmp_path / 'hA'))
    code, out, err = run_cli(capsys, '-c', cfg_a, 'cluster', 'init',
                             '--host', 'hA', '--ca-key',
                             str(ca_store / 'ca.key'))
    assert code == 0, err
    assert mode(ca_store / 'ca.key') == 0o600
    assert not (tmp_path / 'hA' / 'ssl' / 'ca.key').exists()
    ca_crt = tmp_path / 'hA' / 'ssl' / 'ca.crt'

    # hB joins with the CA key at hand (e.g. a mounted key): one command.
    cfg_b = write_cluster(str(tmp_path / 'hB'))
    code, out, err = run_cli(capsys, '-c', cfg_b, 'cluster', 'join',
                             '--host', 'hB')
    assert code == 2 and 'ca.crt' in err  # ca.crt must be copied first
    os.makedirs(str(tmp_path / 'hB' / 'ssl'))
    (tmp_path / 'hB' / 'ssl' / 'ca.crt').write_bytes(ca_crt.read_bytes())
    code, out, err = run_cli(capsys, '-c', cfg_b, 'cluster', 'join',
                             '--host', 'hB', '--ca-key',
                             str(ca_store / 'ca.key'))
    assert code == 0, err
    hb = pki.load_cert(str(tmp_path / 'hB' / 'ssl' / 'hB.crt'))
    assert (pki.cert_name(hb), pki.cert_role(hb)) == ('hB', 'host')
    assert mode(tmp_path / 'hB' / 'ssl' / 'hB.key') == 0o600

    # hC: without the CA key, join makes a key and a request ...
    ssl_c = tmp_path / 'hC' / 'ssl'
    cfg_c = write_cluster(str(tmp_path / 'hC'))
    os.makedirs(str(ssl_c))
    (ssl_c / 'ca.crt').write_bytes(ca_crt.read_bytes())
    code, out, err = run_cli(capsys, '-c', cfg_c, 'cluster', 'join',
                             '--host', 'hC')
    assert code == 0, err
    assert 'cert sign hC.csr --role host' in out
    key_bytes = (ssl_c / 'hC.key').read_bytes()
    assert mode(ssl_c / 'hC.key') == 0o600
    # ... `cert request` again keeps that key ...
    code, out, err = run_cli(capsys, '-c', cfg_c, 'cert', 'request',
                             '--host', 'hC')
    assert code == 0 and 'existing key' in out
    # ... the request alone travels to the CA key's machine ...
    signing = tmp_path / 'signing'
    signing.mkdir()
    (signing / 'hC.csr').write_bytes((ssl_c / 'hC.csr').read_bytes())
    code, out, err = run_cli(capsys, '-c', cfg_a, 'cert', 'sign',
                             str(signing / 'hC.csr'), '--role', 'host',
                             '--ca-key', str(ca_store / 'ca.key'))
    assert code == 0, err
    assert not list(signing.glob('*.key'))
    # ... and the certificate comes back.
    code, out, err = run_cli(capsys, '-c', cfg_c, 'cert', 'install',
                             str(signing / 'hC.crt'))
    assert code == 0, err
    hc = pki.load_cert(str(ssl_c / 'hC.crt'))
    assert (pki.cert_name(hc), pki.cert_role(hc)) == ('hC', 'host')
    assert (ssl_c / 'hC.key').read_bytes() == key_bytes
    assert not (ssl_c / 'hC.csr').exists()
    san = hc.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == \
        ['127.0.0.3']
    # A certificate for another key, or of another CA, is not installed.
    pki.write_csr(str(signing / 'stolen.csr'),
                  pki.make_csr(pki.new_key(), 'hC'))
    code, out, err = run_cli(capsys, '-c', cfg_a, 'cert', 'sign',
                             str(signing / 'stolen.csr'), '--role', 'host',
                             '--out', str(signing / 'stolen.crt'),
                             '--ca-key', str(ca_store / 'ca.key'))
    assert code == 0, err
    code, out, err = run_cli(capsys, '-c', cfg_c, 'cert', 'install',
                             str(signing / 'stolen.crt'))
    assert code == 2 and 'not for this key' in err, err
    other_key, other_ca = pki.create_ca('test')
    make_pair(str(signing), 'forged', other_key, other_ca, 'hC', 'host',
              '127.0.0.3')
    code, out, err = run_cli(capsys, '-c', cfg_c, 'cert', 'install',
                             str(signing / 'forged.crt'))
    assert code == 2 and 'CA' in err, err
    # A host request signed for a name that is not a host is refused.
    key = pki.new_key()
    pki.write_csr(str(signing / 'hZ.csr'), pki.make_csr(key, 'hZ'))
    code, out, err = run_cli(capsys, '-c', cfg_a, 'cert', 'sign',
                             str(signing / 'hZ.csr'), '--role', 'host',
                             '--ca-key', str(ca_store / 'ca.key'))
    assert code == 2 and 'not a host' in err


def test_operator_certificates_roles_and_revocation_end_to_end(tmp_path,
                                                               capsys):
    cfg = write_cluster(str(tmp_path))
    ssl_dir = tmp_path / 'ssl'
    assert run_cli(capsys, '-c', cfg, 'cluster', 'init', '--host',
                   'hA')[0] == 0
    # Where the CA key is: an operator's files in one go.
    alice = tmp_path / 'alice'
    code, out, err = run_cli(capsys, '-c', cfg, 'cert', 'issue', 'alice',
                             '--role', 'operator', '--dir', str(alice))
    assert code == 0, err
    assert mode(alice / 'operator.key') == 0o600
    assert mode(alice) == 0o700
    code, out, err = run_cli(capsys, 'cert', 'show', '--json',
                             str(alice / 'operator.crt'))
    facts = json.loads(out)
    assert (facts['name'], facts['role'], facts['expired']) == \
        ('alice', 'operator', False)
    # Elsewhere: request, sign, install; the key stays with bob.
    bob = tmp_path / 'bob'
    code, out, err = run_cli(capsys, 'cert', 'request', '--operator', 'bob',
                             '--dir', str(bob))
    assert code == 0, err
    code, out, err = run_cli(capsys, '-c', cfg, 'cert', 'sign',
                             str(bob / 'operator.csr'), '--role', 'guest',
                             '--out', str(tmp_path / 'bob.crt'))
    assert code == 0, err
    code, out, err = run_cli(capsys, 'cert', 'install',
                             str(tmp_path / 'bob.crt'), '--dir', str(bob),
                             '--ca', str(ssl_dir / 'ca.crt'))
    assert code == 0, err
    assert pki.cert_role(pki.load_cert(str(bob / 'operator.crt'))) == 'guest'

    cluster = config.load_cluster(cfg)
    api = HttpsApi(FakeAgent(), cluster, 'hA', port=0).start()
    try:
        def client(folder):
            return ApiClient(api.url, str(folder / 'operator.crt'),
                             str(folder / 'operator.key'),
                             str(folder / 'ca.crt'))
        with client(alice) as a, client(bob) as b:
            assert a.whoami()['role'] == 'operator'
            assert a.action('web', 'stop').startswith('web: stop')
            assert b.whoami()['name'] == 'bob'
            with pytest.raises(ApiRefused) as e:
                b.action('web', 'stop')
            assert e.value.status == 403
            # Revoked: refused at once, by serial or by file.
            code, out, err = run_cli(capsys, '-c', cfg, 'cert', 'revoke',
                                     str(alice / 'operator.crt'))
            assert code == 0 and 'revoked' in out, err
            with pytest.raises(ApiRefused) as e:
                a.whoami()
            assert e.value.status == 403 and 'revoked' in e.value.message
            serial = b.whoami()['serial']
            code, out, err = run_cli(capsys, '-c', cfg, 'cert', 'revoke',
                                     serial)
            assert code == 0, err
            with pytest.raises(ApiRefused, match='revoked'):
                b.status()
            code, out, err = run_cli(capsys, '-c', cfg, 'cert', 'revoke',
                                     serial)
            assert code == 0 and 'already revoked' in out
        # A revocation list not signed by the CA: every client refused.
        other_key, other_ca = pki.create_ca('test')
        with open(str(ssl_dir / 'crl.pem'), 'rb') as f:
            good = f.read()
        pki.write_crl(str(ssl_dir / 'crl.pem'),
                      pki.empty_crl(other_key, other_ca))
        with ApiClient.for_host(cluster, 'hA') as h:
            h.url = api.url
            with pytest.raises(ApiRefused) as e:
                h.whoami()
            assert e.value.status == 503
            with open(str(ssl_dir / 'crl.pem'), 'wb') as f:
                f.write(good)
            assert h.whoami()['role'] == 'host'
    finally:
        api.stop()


def test_keys_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = pki.write_key(str(tmp_path / 'k.key'), pki.new_key())
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    with pytest.raises(pki.PkiError, match='already exists'):
        pki.write_key(path, pki.new_key())
    assert not [p for p in os.listdir(str(tmp_path)) if p.endswith('.tmp')]


def test_api_stays_off_without_a_ca_and_refuses_a_readable_key(tmp_path):
    cluster = config.load_cluster(write_cluster(str(tmp_path)))
    api = HttpsApi(FakeAgent(), cluster, 'hA', port=0).start()
    assert api.server is None and api.url is None
    api.stop()
    ssl_dir = str(tmp_path / 'ssl')
    os.makedirs(ssl_dir)
    ca_key, ca_cert = pki.create_ca('test')
    pki.write_cert(os.path.join(ssl_dir, 'ca.crt'), ca_cert)
    with pytest.raises(config.ConfigError, match='hA.crt is missing'):
        HttpsApi(FakeAgent(), cluster, 'hA', port=0).start()
    make_pair(ssl_dir, 'hA', ca_key, ca_cert, 'hA', 'host', '127.0.0.1')
    os.chmod(os.path.join(ssl_dir, 'hA.key'), 0o644)
    with pytest.raises(config.ConfigError, match='chmod 600'):
        HttpsApi(FakeAgent(), cluster, 'hA', port=0).start()


def test_pki_commands_work_as_python_m(tmp_path):
    # `python -m slaposha.cli.main` (as the lab runs it) has them too.
    cfg = write_cluster(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=TOP)
    out = subprocess.run(
        [sys.executable, '-m', 'slaposha.cli.main', '-c', cfg, 'cluster',
         'init', '--host', 'hA'], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [sys.executable, '-m', 'slaposha.cli.main', 'cert', 'show',
         str(tmp_path / 'ssl' / 'hA.crt')], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert out.returncode == 0 and 'hA: role host' in out.stdout, out.stderr
