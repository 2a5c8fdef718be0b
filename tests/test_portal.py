"""The portal (``slaposha portal``): many clusters on one page and in one
JSON API.

These tests put the portal in front of stand-in clusters: the agents'
real HTTPS API (slaposha.api.https, each cluster with its own CA) over a
stand-in agent without etcd, as tests/test_api.py does; what is tested is
the portal between them and its users. The lab test runs two real clusters
(etcd members, agents) and drives the page in headless Chromium: both
clusters shown, an action from the page moves a service, a cluster cut off
shows as unreachable while the other keeps updating.
"""

import json
import os
import shutil
import sys
import textwrap
import threading
import time

import pytest
import requests

from slaposha import config, pki
from slaposha.actions import ActionError
from slaposha.api.https import HttpsApi
from slaposha.cli.main import main
from slaposha.lab import wait_for
from slaposha.portal.config import load_portal
from slaposha.portal.server import OPENAPI_PATH, ROUTES, Portal

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
SCREENSHOT = os.path.join(TOP, 'docs', 'portal.png')


# -- stand-in clusters --------------------------------------------------------

DIVERGED = {'rid': 'btrfs#data', 'id': '000012-9', 'at': 1764850000.0,
            'token': 9, 'size': 4096}


class StandIn(object):
    """One cluster's state, shared by the stand-in agents of its hosts:
    services whose owner the actions move, their history and decisions."""

    def __init__(self, name, hosts, services):
        self.name = name
        self.hosts = list(hosts)
        self.lock = threading.Lock()
        self.owner = dict(services)          # service: owner host or None
        self.token = {s: 10 for s in services}
        self.frozen = {s: None for s in services}
        self.down = set()
        self.history = []
        self.calls = []
        # (service, host): the diverged copies that host's agent lists.
        self.diverged = {('web', 'hB'): [DIVERGED]}

    def agent(self, host):
        return StandInAgent(self, host)

    def move(self, service, to, kind='switch'):
        with self.lock:
            self.history.append({
                'service': service, 'kind': kind,
                'from': self.owner[service], 'to': to,
                'token': self.token[service] + 5, 'running': time.time(),
                'duration': 0.5})
            self.owner[service] = to
            self.token[service] += 5

    def status(self, host):
        with self.lock:
            return {
                'cluster': self.name, 'host': host, 'etcd': 'ok',
                'hosts': {h: {'alive': h not in self.down, 'role': 'host',
                              'address': '127.0.0.1', 'ineligible': {}}
                          for h in self.hosts},
                'services': {s: {
                    'orchestrate': 'ha', 'hosts': self.hosts,
                    'owner': o, 'token': self.token[s] if o else None,
                    'frozen': self.frozen[s], 'target': None,
                    'switch': None,
                    'resources': [['app#main', 'up', '1 process(es)']]
                    if o else [],
                    'on': {h: None if h in self.down else {
                        'state': 'running' if h == o else 'stopped',
                        'decision': [time.time(), 'standby', 'x'],
                        'diverged': self.diverged.get((s, h), [])}
                        for h in self.hosts}}
                    for s, o in sorted(self.owner.items())}}


class StandInAgent(object):
    """What the HTTPS API asks of the agent of ``host``."""

    def __init__(self, cluster, host):
        self.cluster = cluster
        self.host = host
        self.decision_log = []
        self.etcd = 'ok'

    def local_status(self):
        c = self.cluster
        with c.lock:
            return {'host': self.host, 'time': time.time(),
                    'etcd': self.etcd,
                    'lease': {'id': '1', 'valid': True, 'time_left': 2.0,
                              'lost': None},
                    'services': {s: {
                        'state': 'running' if o == self.host else 'stopped',
                        'owner': o, 'token': None, 'decision': None,
                        'resources': [], 'lags': {} if o == self.host
                        else {'btrfs#data': 0.8}}
                        for s, o in c.owner.items()}}

    def cluster_status(self):
        if self.etcd != 'ok':
            return {'cluster': self.cluster.name, 'host': self.host,
                    'etcd': self.etcd, 'local': self.local_status()}
        return dict(self.cluster.status(self.host),
                    local=self.local_status())

    def history(self):
        with self.cluster.lock:
            return list(self.cluster.history)

    def action(self, name, verb, params=None):
        c = self.cluster
        params = params or {}
        if name not in c.owner:
            raise ActionError('no service %r' % name)
        with c.lock:
            c.calls.append((self.host, name, verb, dict(params)))
            frozen = c.frozen[name]
        if frozen and verb not in ('freeze', 'thaw'):
            raise ActionError('%s is frozen by %s: thaw it first'
                              % (name, frozen['by']))
        self.decision_log.append({'service': name, 'time': time.time(),
                                  'action': verb, 'reason': 'asked by %s'
                                  % params.get('by')})
        if verb == 'freeze':
            c.frozen[name] = {'by': params.get('by'), 'at': time.time()}
            return '%s frozen' % name
        if verb == 'thaw':
            c.frozen[name] = None
            return '%s thawed' % name
        if verb in ('switch', 'takeover'):
            to = params.get('to') if verb == 'switch' else self.host
            c.move(name, to, 'switch')
            return '%s: moving to %s' % (name, to)
        if verb == 'stop':
            with c.lock:
                c.owner[name] = None
            return '%s: stopping' % name
        with c.lock:
            c.owner[name] = params.get('to') or self.host
        return '%s: starting' % name


def issue(folder, stem, ca_key, ca_cert, name, role, address=None):
    key = pki.new_key()
    cert = pki.issue(ca_key, ca_cert, key.public_key(), name, role,
                     address=address, days=2)
    os.makedirs(folder, exist_ok=True)
    pki.write_key(os.path.join(folder, stem + '.key'), key, overwrite=True)
    pki.write_cert(os.path.join(folder, stem + '.crt'), cert)
    return os.path.join(folder, stem + '.crt'), os.path.join(folder,
                                                            stem + '.key')


def operator_dir(folder, ca_key, ca_cert, ca_path, role, name='portal'):
    """What `slaposha cert issue --dir` leaves: the portal's certificate
    for a cluster."""
    issue(folder, 'operator', ca_key, ca_cert, name, role)
    shutil.copy(ca_path, os.path.join(folder, 'ca.crt'))
    return folder


class Clusters(object):
    """Stand-in clusters east (hA, hB) and west (hC), each agent's real
    HTTPS API on 127.0.0.1; the portal's CA, its users and portal file."""

    def __init__(self, folder, west_role='operator'):
        self.folder = folder
        self.apis = {}
        self.stand_ins = {'east': StandIn('lab-east', ['hA', 'hB'],
                                          {'web': 'hA'}),
                          'west': StandIn('lab-west', ['hC'], {'db': 'hC'})}
        endpoints = {}
        for label, hosts in (('east', ('hA', 'hB')), ('west', ('hC',))):
            base = os.path.join(folder, label)
            ssl_dir = os.path.join(base, 'ssl')
            os.makedirs(ssl_dir)
            lines = ['[cluster]', 'name = lab-%s' % label,
                     'hosts = %s' % ' '.join(hosts), 'ssl_dir = %s' % ssl_dir,
                     '[api]', 'listen = 127.0.0.1']
            for h in hosts:
                lines += ['[host %s]' % h, 'address = 127.0.0.1']
            # No etcd behind the stand-ins (two embedded members would
            # want a witness).
            lines += ['[etcd]', 'mode = external',
                      'endpoints = http://127.0.0.1:1']
            path = os.path.join(base, 'cluster.cfg')
            with open(path, 'w') as f:
                f.write('\n'.join(lines) + '\n')
            cluster = config.load_cluster(path)
            ca_key, ca_cert = pki.create_ca('lab-' + label)
            ca_path = pki.write_cert(os.path.join(ssl_dir, 'ca.crt'),
                                     ca_cert)
            for h in hosts:
                issue(ssl_dir, h, ca_key, ca_cert, h, 'host', '127.0.0.1')
                api = HttpsApi(self.stand_ins[label].agent(h), cluster, h,
                               port=0).start()
                self.apis[h] = api
                endpoints.setdefault(label, []).append(api.url)
            operator_dir(os.path.join(folder, 'portal-' + label), ca_key,
                         ca_cert, ca_path,
                         west_role if label == 'west' else 'operator')
        # The portal's own CA, its certificate and its users.
        self.ssl_dir = os.path.join(folder, 'portal')
        os.makedirs(self.ssl_dir)
        self.ca_key, ca_cert = pki.create_ca('portal')
        self.ca = pki.write_cert(os.path.join(self.ssl_dir, 'ca.crt'),
                                 ca_cert)
        issue(self.ssl_dir, 'portal', self.ca_key, ca_cert, 'portal',
              'host', '127.0.0.1')
        users = os.path.join(folder, 'users')
        self.users = {role: issue(users, role, self.ca_key, ca_cert,
                                  'alice-' + role, role)
                      for role in ('guest', 'operator')}
        self.users['host'] = issue(users, 'host', self.ca_key, ca_cert,
                                   'hX', 'host', '127.0.0.1')
        self.path = os.path.join(folder, 'portal.cfg')
        with open(self.path, 'w') as f:
            f.write('\n'.join([
                '[portal]', 'name = test portal',
                'ssl_dir = %s' % self.ssl_dir,
                'poll_interval = 0.3', 'request_timeout = 1',
                'retry_interval = 0.3', 'keepalive = 2',
                '[cluster east]', 'site = paris',
                'endpoints = %s' % ' '.join(endpoints['east']),
                'cert_dir = %s' % os.path.join(folder, 'portal-east'),
                '[cluster west]', 'site = lille',
                'endpoints = %s' % ' '.join(endpoints['west']),
                'cert_dir = %s' % os.path.join(folder, 'portal-west'),
            ]) + '\n')
        self.portal = Portal(load_portal(self.path), port=0).start()
        self.url = self.portal.url

    def request(self, who, method, route, **kwargs):
        kwargs.setdefault('timeout', 10)
        return requests.request(method, self.url + route, verify=self.ca,
                                cert=self.users[who], **kwargs)

    def view(self, who='guest', query=''):
        r = self.request(who, 'GET', '/api/view' + query)
        assert r.status_code == 200, r.text
        return {c['name']: c for c in r.json()['clusters']}

    def wait(self, predicate, what, timeout=10):
        return wait_for(lambda: predicate(self.view()), timeout,
                        interval=0.1, what=what)

    def stop(self):
        self.portal.stop()
        for api in self.apis.values():
            api.stop()


@pytest.fixture
def clusters(tmp_path):
    c = Clusters(str(tmp_path))
    try:
        yield c
    finally:
        c.stop()


def error_line(response):
    assert response.headers['Content-Type'] == 'application/json'
    assert response.text.count('\n') == 1, response.text
    answer = response.json()
    assert list(answer) == ['error']
    return answer['error']


def post(clusters, who, route, body, **kwargs):
    return clusters.request(who, 'POST', route, data=json.dumps(body),
                            headers=dict({'Content-Type': 'application/json'},
                                         **kwargs.pop('headers', {})),
                            **kwargs)


# -- what it shows, what it lets do, what it refuses --------------------------

def test_portal_shows_both_clusters_relays_actions_and_marks_the_silent_one(
        clusters):
    view = clusters.wait(lambda v: v['east']['state'] == 'ok' and
                         v['west']['state'] == 'ok' and
                         v['east']['history'] is not None and v,
                         'both clusters seen')
    east, west = view['east'], view['west']
    assert (east['cluster'], east['site'], west['site']) == (
        'lab-east', 'paris', 'lille')
    web = east['services'][0]
    assert (web['name'], web['owner'], web['token'], web['state']) == (
        'web', 'hA', 10, 'up')
    standby = [h for h in web['hosts'] if h['role'] == 'standby'][0]
    # Standby freshness comes from hB's own view.
    assert standby['name'] == 'hB' and standby['eligible'] is True
    assert standby['lags'] == {'btrfs#data': 0.8} and standby['lags_at']
    # The diverged copies each host keeps, as its agent lists them.
    assert standby['diverged'] == [DIVERGED]
    assert [h['diverged'] for h in web['hosts'] if h['role'] == 'owner'] \
        == [[]]
    assert east['certificate']['role'] == 'operator'
    assert east['streaming'] in (clusters.apis['hA'].url,
                                 clusters.apis['hB'].url)
    assert east['may_act'] is False   # for a guest
    assert clusters.view('operator')['east']['may_act'] is True

    # Filters: by cluster, site, state; a name it does not know is refused.
    assert list(clusters.view(query='?cluster=west')) == ['west']
    assert list(clusters.view(query='?site=paris,lille')) == ['east', 'west']
    assert clusters.view(query='?state=down') == {}
    r = clusters.request('guest', 'GET', '/api/view?site=rome')
    assert r.status_code == 400 and "no site 'rome'" in error_line(r)
    r = clusters.request('guest', 'GET', '/api/view?colour=red')
    assert r.status_code == 400 and 'unknown query' in error_line(r)

    # Actions: a guest may not; an operator with what they saw may; the
    # portal refuses when the service moved since they confirmed.
    route = '/api/clusters/east/services/web/switch'
    r = post(clusters, 'guest', route, {'to': 'hB', 'token': 10})
    assert r.status_code == 403 and 'needs role operator' in error_line(r)
    r = post(clusters, 'operator', route, {'to': 'hB', 'token': 9})
    assert r.status_code == 409 and 'changed since you confirmed' in \
        error_line(r)
    r = post(clusters, 'operator', route, {'to': 'hB'},
             headers={'Origin': 'https://elsewhere.example'})
    assert r.status_code == 403 and 'another site' in error_line(r)
    r = clusters.request('operator', 'POST', route, data='{"to": "hB"}',
                         headers={'Content-Type': 'text/plain'})
    assert r.status_code == 415
    r = post(clusters, 'operator', route, {'to': 'hZ'})
    assert r.status_code == 400 and 'its hosts are hA hB' in error_line(r)
    assert clusters.stand_ins['east'].calls == []
    r = post(clusters, 'operator', route, {'to': 'hB', 'token': 10},
             headers={'Origin': clusters.url})
    assert r.status_code == 200, r.text
    assert r.json()['message'] == 'web: moving to hB'
    host, name, verb, params = clusters.stand_ins['east'].calls[-1]
    assert (name, verb, params['to'], params['by']) == (
        'web', 'switch', 'hB', 'operator portal for alice-operator')
    # The history is read again when an owner changes.
    clusters.wait(lambda v: v['east']['services'][0]['owner'] == 'hB' and
                  (v['east']['history'] or [{}])[-1].get('to') == 'hB',
                  'web on hB in the view and its history')
    # A takeover goes to the agent of the host that takes it.
    r = post(clusters, 'operator', '/api/clusters/east/services/web/takeover',
             {'to': 'hA', 'token': 15})
    assert r.status_code == 200, r.text
    assert r.json()['via'] == clusters.apis['hA'].url
    assert clusters.stand_ins['east'].calls[-1][:3] == ('hA', 'web',
                                                        'takeover')
    # The agent's refusal comes back as it said it.
    assert post(clusters, 'operator', '/api/clusters/east/services/web/'
                'freeze', {}).status_code == 200
    r = post(clusters, 'operator', route, {'to': 'hB'})
    assert r.status_code == 409 and 'frozen by operator portal' in \
        error_line(r)

    # The service's page: the service, its history and the decisions.
    r = clusters.request('guest', 'GET', '/api/clusters/east/services/web')
    assert r.status_code == 200, r.text
    page = r.json()
    assert [e['to'] for e in page['history']] == ['hB', 'hA']
    assert [d['action'] for d in page['decisions']] == [
        'switch', 'takeover', 'freeze']
    assert page['decisions'][1]['host'] == 'hA' and not page['unanswered']
    r = clusters.request('guest', 'GET', '/api/clusters/east/services/nope')
    assert r.status_code == 404 and 'services: web' in error_line(r)

    # An agent cut off from etcd: the view comes from another, and says so.
    followed = east_agent = None
    for host in ('hA', 'hB'):
        if clusters.apis[host].url == clusters.view()['east']['via']:
            followed, east_agent = host, clusters.apis[host].agent
    east_agent.etcd = 'cannot read the cluster: no endpoint answered'
    other = {'hA': 'hB', 'hB': 'hA'}[followed]
    cut_off = 'the agent of %s: cannot read the cluster: no endpoint' \
        ' answered' % followed
    view = clusters.wait(lambda v: v['east']['via'] ==
                         clusters.apis[other].url and
                         cut_off in v['east']['problems'] and v,
                         'east seen from %s' % other)
    assert view['east']['problems'] == [
        'web frozen by operator portal for alice-operator: the agents'
        ' neither start nor move it', cut_off]
    assert [s['name'] for s in view['east']['services']] == ['web']
    east_agent.etcd = 'ok'

    # The event stream: a view now, and the silent cluster shown as such
    # while the other keeps changing.
    events = requests.get(clusters.url + '/api/events', stream=True,
                          verify=clusters.ca, cert=clusters.users['guest'],
                          timeout=10)
    assert events.headers['Content-Type'] == 'text/event-stream'
    stream = views_of(events)
    assert set(next(stream)) == {'east', 'west'}
    clusters.apis['hC'].stop()
    clusters.stand_ins['east'].move('web', 'hB', 'takeover')
    moved = clusters.stand_ins['east'].token['web']
    began = time.monotonic()
    seen = None
    for seen in stream:
        if seen['west']['state'] == 'unreachable' and \
                seen['east']['services'][0]['token'] == moved:
            break
        assert time.monotonic() - began < 10, seen['west']
    events.close()
    assert 'no agent answers' in seen['west']['error']
    assert seen['west']['services'][0]['name'] == 'db'   # as last seen
    assert seen['east']['state'] != 'unreachable'
    r = post(clusters, 'operator', '/api/clusters/west/services/db/stop', {})
    assert r.status_code == 503 and 'does not answer' in error_line(r)


def views_of(response):
    """Each view event of a portal event stream, {cluster: view}."""
    data = []
    for raw in response.iter_lines(decode_unicode=True):
        if raw.startswith('data: '):
            data.append(raw[6:])
        elif raw == '' and data:
            yield {c['name']: c for c in json.loads(''.join(data))
                   ['clusters']}
            data = []


def test_portal_refuses_who_may_not_use_it_and_acts_no_further_than_its_cert(
        tmp_path):
    c = Clusters(str(tmp_path), west_role='guest')
    try:
        c.wait(lambda v: v['west']['certificate'].get('may') and v,
               'the portal\'s role on west')
        assert c.view('operator')['west']['may_act'] is False
        r = post(c, 'operator', '/api/clusters/west/services/db/stop', {})
        assert r.status_code == 403 and 'may not act there' in error_line(r)
        assert c.stand_ins['west'].calls == []
        r = c.request('host', 'GET', '/api/view')
        assert r.status_code == 403 and 'host certificate' in error_line(r)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(c.url + '/api/view', verify=c.ca, timeout=5)
        # A client of a cluster's CA is not a user of the portal.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(c.url + '/api/view', verify=c.ca, timeout=5,
                         cert=(os.path.join(c.folder, 'portal-east',
                                            'operator.crt'),
                               os.path.join(c.folder, 'portal-east',
                                            'operator.key')))
        # Revoked by the portal CA's list: refused at once.
        serial = pki.load_cert(c.users['operator'][0]).serial_number
        pki.revoke(c.ca_key, pki.load_cert(c.ca),
                   os.path.join(c.ssl_dir, 'crl.pem'), [serial])
        r = c.request('operator', 'GET', '/api/whoami')
        assert r.status_code == 403 and 'revoked' in error_line(r)
        # The page: one file, its script allowed by hash and nothing else.
        r = c.request('guest', 'GET', '/')
        assert r.status_code == 200 and '<script>' in r.text
        policy = r.headers['Content-Security-Policy']
        assert "default-src 'none'" in policy and 'unsafe' not in policy
        assert r.headers['X-Frame-Options'] == 'DENY'
    finally:
        c.stop()


# -- the portal file and its commands -----------------------------------------

def test_portal_file_mistakes_are_one_line_and_it_never_runs_beside_a_ca_key(
        tmp_path, capsys):
    folder = str(tmp_path)
    ca_key, ca_cert = pki.create_ca('lab-a')
    ca_path = pki.write_cert(os.path.join(folder, 'lab-ca.crt'), ca_cert)
    certs = operator_dir(os.path.join(folder, 'a'), ca_key, ca_cert, ca_path,
                         'operator')
    ca_dir = os.path.join(folder, 'portal-ca')
    path = os.path.join(folder, 'portal.cfg')

    def check(text, *expected):
        with open(path, 'w') as f:
            f.write(text)
        code = main(['portal', 'check', '--offline', '--config', path])
        out, err = capsys.readouterr()
        for words in expected:
            assert words in err, err
        if expected:
            assert code == 2 and err.count('\n') == 1, err
        return code, out

    cluster = '[cluster a]\nendpoints = https://10.0.0.1:1215\n' \
        'cert_dir = %s\n' % certs
    check('[portal]\nport = 99999\n' + cluster, '[portal] port: must be at'
          ' most 65535')
    check('[portal]\ncolour = red\n' + cluster, '[portal] colour: unknown'
          ' key')
    check('[portal]\n', 'no [cluster <name>] section')
    check(cluster.replace('https', 'http'), '[cluster a] endpoints:',
          'HTTPS only')
    check(cluster + cluster.replace('[cluster a]', '[cluster b]'),
          'also an endpoint of cluster a')
    # The portal's own files: `portal init` makes them, never beside its
    # CA key, and never twice.
    portal = '[portal]\nlisten = 127.0.0.1\nssl_dir = %s\n' % os.path.join(
        folder, 'ssl') + cluster
    check(portal, '[portal] ssl_dir:', 'portal init')
    assert main(['portal', 'init', '--config', path, '--ca-key',
                 os.path.join(folder, 'ssl', 'ca.key')]) == 2
    assert 'not in ssl_dir' in capsys.readouterr().err
    assert main(['portal', 'init', '--config', path, '--ca-key',
                 os.path.join(ca_dir, 'ca.key'), '--name', 'portal']) == 0
    assert 'portal certificate' in capsys.readouterr().out
    assert stat_mode(os.path.join(ca_dir, 'ca.key')) == 0o600
    assert not os.path.exists(os.path.join(folder, 'ssl', 'ca.key'))
    assert main(['portal', 'init', '--config', path, '--ca-key',
                 os.path.join(ca_dir, 'other.key')]) == 2
    assert 'already exists' in capsys.readouterr().err
    code, out = check(portal)
    assert code == 0 and 'a: 1 endpoint(s), certificate operator' in out
    check(portal.replace(certs, folder), '[cluster a] cert_dir:',
          'operator.key')
    # A CA key where the portal reads its files, a key others may read, a
    # host's or a CA's certificate: refused, each in one line.
    shutil.copy(os.path.join(ca_dir, 'ca.key'), os.path.join(certs,
                                                             'ca.key'))
    check(portal, '[cluster a] cert_dir:', 'the portal never holds one')
    os.unlink(os.path.join(certs, 'ca.key'))
    os.chmod(os.path.join(certs, 'operator.key'), 0o644)
    check(portal, 'readable by others')
    os.chmod(os.path.join(certs, 'operator.key'), 0o600)
    issue(certs, 'operator', ca_key, ca_cert, 'hA', 'host', '10.0.0.1')
    check(portal, 'has role host')
    pki.write_key(os.path.join(certs, 'operator.key'), ca_key, overwrite=True)
    pki.write_cert(os.path.join(certs, 'operator.crt'), ca_cert)
    check(portal, 'is a CA certificate')
    # The keys are documented with the others.
    assert main(['config', 'keys']) == 0
    out = capsys.readouterr().out
    assert '# portal file' in out and 'poll_interval (duration' in out


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


# -- the API and its description ----------------------------------------------

def spec_routes(spec):
    return {(method.upper(), path) for path, item in spec['paths'].items()
            for method in item}


def test_openapi_lists_every_route_and_only_those(clusters):
    with open(OPENAPI_PATH) as f:
        spec = json.load(f)
    served = clusters.request('guest', 'GET', '/openapi.json').json()
    assert served == spec
    assert spec_routes(spec) == {(r.method, r.template) for r in ROUTES}
    clusters.wait(lambda v: v['east']['state'] == 'ok', 'east seen')
    for method, path in sorted(spec_routes(spec)):
        route = path.replace('{cluster}', 'east').replace(
            '{name}', 'web').replace('{action}', 'thaw')
        r = (post(clusters, 'operator', route, {}) if method == 'POST' else
             clusters.request('guest', method, route,
                              stream=route == '/api/events'))
        assert r.status_code == 200, (method, route, r.text[:200])
        r.close()
        codes = set(spec['paths'][path][method.lower()]['responses'])
        assert {'200', '400', '403', '413', '503'} <= codes, path
        if '{' in path:
            assert '404' in codes, path


def test_fuzz_from_the_openapi_description_finds_no_5xx(clusters):
    """schemathesis, from the served description: no 5xx for bad input,
    each answer as described, the portal still serving."""
    if sys.version_info < (3, 11):
        pytest.skip('schemathesis 4 needs Python 3.11 or newer')
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, negative_data_rejection,
        response_schema_conformance, status_code_conformance)
    clusters.wait(lambda v: v['east']['state'] == 'ok', 'east seen')
    spec = clusters.request('guest', 'GET', '/openapi.json').json()
    schema = schemathesis.openapi.from_dict(spec)
    session = requests.Session()
    checks = [not_a_server_error, status_code_conformance,
              content_type_conformance, response_schema_conformance]
    count = [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == '/api/events':
            continue  # an endless stream; tested above
        raw = spec['paths'][operation.path][operation.method.lower()]
        inputs = len(raw.get('parameters') or []) + ('requestBody' in raw)
        # Anything at all, then with a cluster and service that exist (to
        # reach them); invalid data only where there is something to break.
        fixed = {k: v for k, v in (('cluster', 'east'), ('name', 'web'))
                 if '{%s}' % k in operation.path}
        modes = [(GenerationMode.POSITIVE, None)]
        if inputs:
            modes.append((GenerationMode.NEGATIVE, None))
        if fixed:
            modes.append((GenerationMode.POSITIVE, fixed))
            if inputs > len(fixed):
                modes.append((GenerationMode.NEGATIVE, fixed))
        for mode, params in modes:
            @settings(max_examples=12, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode,
                                              path_parameters=params))
            def run(case):
                response = case.call(base_url=clusters.url, session=session,
                                     verify=clusters.ca,
                                     cert=clusters.users['operator'],
                                     timeout=10)
                count[0] += 1
                case.validate_response(response, checks=checks + (
                    [negative_data_rejection]
                    if mode == GenerationMode.NEGATIVE else []))
            run()
    assert count[0] > 60
    assert clusters.request('guest', 'GET', '/api/whoami').status_code == 200

# -- in the lab, with a browser -----------------------------------------------

def cluster_certs(lc, folder):
    """The portal's operator certificate for a lab cluster, as `slaposha
    cert issue --dir` leaves it (the cluster's CA key stays where it is)."""
    ssl_dir = os.path.join(lc.config_dir, 'ssl')
    ca = os.path.join(ssl_dir, 'ca.crt')
    return operator_dir(folder, pki.load_key(os.path.join(ssl_dir, 'ca.key')),
                        pki.load_cert(ca), ca, 'operator')


@pytest.mark.lab
def test_two_lab_clusters_in_a_browser_switch_and_one_cut_off(make_lab,
                                                              tmp_path):
    if shutil.which('chromium') is None:
        pytest.skip('no chromium (tools/setup.sh installs it)')
    from slaposha.lab.browser import Browser, BrowserError, relay
    from slaposha.lab.cluster import LabCluster, Observer, check_no_overlap
    lab = make_lab(['hA', 'hB', 'hW', 'hC', 'hP'])
    marker = str(86400 + int(lab.id, 16))
    app = '[app#main]\ncommand = exec sleep %s\n' % marker
    east = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, name='east',
                      config_dir=os.path.join(lab.workdir, 'east'),
                      services={'web': '[service]\nhosts = hA hB\n' + app},
                      settings='[agent]\nmonitor_interval = 0.5\n')
    west = LabCluster(lab, ['hC'], tls=True, name='west',
                      config_dir=os.path.join(lab.workdir, 'west'),
                      services={'db': app.replace('main', 'db')})
    folder = str(tmp_path)
    # The portal: its CA made by `portal init` (the key kept elsewhere), a
    # user's certificate by `cert issue`, an operator certificate per
    # cluster; it runs in hP, which reaches both clusters.
    portal_file = os.path.join(folder, 'portal.cfg')
    address = lab['hP'].address
    with open(portal_file, 'w') as f:
        f.write(textwrap.dedent('''\
            [portal]
            name = lab portal
            listen = %s
            poll_interval = 1
            request_timeout = 2
            [cluster east]
            site = paris
            endpoints = https://%s:1215 https://%s:1215
            cert_dir = %s
            [cluster west]
            site = lille
            endpoints = https://%s:1215
            cert_dir = %s
        ''' % (address, lab['hA'].address, lab['hB'].address,
               cluster_certs(east, os.path.join(folder, 'east')),
               lab['hC'].address,
               cluster_certs(west, os.path.join(folder, 'west')))))
    ca_key = os.path.join(folder, 'portal-ca', 'ca.key')
    assert main(['portal', 'init', '--config', portal_file, '--ca-key',
                 ca_key, '--name', 'portal']) == 0
    alice = os.path.join(folder, 'alice')
    assert main(['cert', 'issue', 'alice', '--role', 'operator', '--ca-key',
                 ca_key, '--ca-cert', os.path.join(folder, 'portal',
                                                   'ca.crt'),
                 '--dir', alice]) == 0
    observer = Observer(lab, marker, hosts=['hA', 'hB']).start()
    procs = []
    try:
        east.start()
        west.start()
        procs.append(lab['hP'].spawn(
            east.command('portal', 'serve', '--config', portal_file),
            name='portal', env=east.env()))
        wait_for(lambda: 'lab portal on https://' in open(
            procs[0].log_path).read(), 20, what='the portal serving')
        procs.append(relay(lab['hP'], 8443, address, 1216, alice,
                           east.env()))
        _, first = east.wait_owner('web', 'hA')
        with Browser(lab['hP'], 'http://127.0.0.1:8443/', lab.workdir,
                     env=east.env()) as page:
            # Both clusters, live, each with its service where it runs.
            page.wait("document.getElementById('live').textContent === 'live'"
                      " && !!document.querySelector('[data-cluster=east]"
                      "[data-state=ok] tr[data-service=web][data-owner=hA]')"
                      " && !!document.querySelector('[data-cluster=west]"
                      "[data-state=ok] tr[data-service=db][data-owner=hC]')",
                      60)
            # An action from the page: confirmed, sent, followed to its end.
            page.eval("document.querySelector('[data-cluster=east]"
                      " tr[data-service=web] button[data-action=switch]')"
                      ".click()")
            text = page.wait("document.getElementById('veil').className"
                             " === 'open' && document.getElementById("
                             "'confirm').textContent")
            assert 'web runs on hA with token %d' % first in text
            page.eval("document.getElementById('confirm-to').value = 'hB';"
                      " document.getElementById('confirm-go').click()")
            try:
                done = page.wait("document.getElementById('result')"
                                 ".getAttribute('data-outcome') === 'done' &&"
                                 " document.getElementById('result')"
                                 ".textContent", 30)
            except BrowserError:
                # What the page said instead, and what the portal saw (it
                # failed once in a full run, never alone).
                raise AssertionError('the switch from the page: %s; the'
                                     ' portal\'s log: %s' % (page.eval(
                                         "document.getElementById('result')"
                                         ".getAttribute('data-outcome') + ': '"
                                         " + document.getElementById("
                                         "'result').textContent"),
                                         open(procs[0].log_path).read()[
                                             -2000:]))
            _, second = east.wait_owner('web', 'hA', not_host='hA')
            assert 'web: moving to hB' in done and \
                'runs on hB (token %d)' % second in done, done
            observer.wait_running('hB', 15)
            # Its page: the switch in its history, by the portal's
            # certificate (the portal's log names the user, below).
            page.eval("location.hash = '#/east/web'")
            row = page.wait("(document.querySelector('#service[data-page="
                            "\"east/web\"] [data-kind=switch]') || {})"
                            ".textContent", 20)
            assert 'hAhB%doperator portal' % second in row, row
            page.eval("location.hash = ''")
            # hC cut off: west is shown unreachable, east keeps updating.
            lab.partition(['hC'])
            east.cli('hA', 'freeze', 'web')
            page.wait("!!document.querySelector('[data-cluster=west]"
                      "[data-state=unreachable] tr[data-service=db]') &&"
                      " !!document.querySelector('[data-cluster=east]"
                      " tr[data-service=web][data-frozen=true]"
                      "[data-owner=hB]')", 30)
            dom = page.dom()
            shot = page.shot(os.path.join(folder, 'portal.png'))
        assert 'no agent answers' in dom
        with open(shot, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        if os.environ.get('SLAPOSHA_SCREENSHOT'):
            shutil.copy(shot, SCREENSHOT)   # docs/portal.png, on request
        check_no_overlap(observer)
        log = open(procs[0].log_path).read()
        assert 'portal: alice (operator): switch web on east to hB: web:' \
            ' moving to hB' in log, log[-2000:]
    finally:
        observer.stop()
        for proc in procs:
            proc.kill()
            proc.wait()
        for lc in (east, west):
            for host in lc.hosts:
                lc.stop_agent(host)
