"""The operator's view: Prometheus metrics, health checks for load
balancers, ``slaposha mon`` and the status page.

The first tests use stand-ins (no etcd): the text format, the plain health
port, a frame of ``mon``. The lab test runs three agents with TLS, switches
the service, crashes its owner, and reads the metrics, the health checks,
``mon --once`` and the status page (in headless Chromium) at each step.
"""

import json
import os
import re
import shutil
import sys
import textwrap
import time

import pytest
import requests

from slaposha import pki
from slaposha.api.health import HealthApi
from slaposha.cli.mon import frame
from slaposha.lab import wait_for
from slaposha.lab.browser import Browser, relay
from slaposha.lab.cluster import LabCluster, Observer, check_no_overlap
from slaposha.metrics import Metrics, exposition

from test_server import ask

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
SCREENSHOT = os.path.join(TOP, 'docs', 'status-page.png')


class StandIn(object):
    """What the metrics and the health checks ask of an agent."""

    def __init__(self, host='hA', owner='hA', token=12, valid=True):
        self.host = host
        self.metrics = Metrics()
        self.slots = {}
        self.owner, self.token, self.valid = owner, token, valid
        self.ineligible = []

    def local_status(self):
        mine = self.owner == self.host
        return {'host': self.host, 'version': 'test', 'etcd': 'ok',
                'lease': {'valid': self.valid, 'time_left': 2.25,
                          'lost': None if self.valid else 'partitioned'},
                'services': {'web': {
                    'state': 'running' if mine else 'stopped',
                    'owner': self.owner, 'token': self.token if mine
                    else None, 'owner_token': self.token,
                    'decision': None, 'ineligible': self.ineligible,
                    'failed': False, 'lags': {'btrfs#data': 0.8},
                    'resources': [['app#main', 'up', '1 process(es)']]
                    if mine else []}}}


# -- the text format ------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, frozenset(labels)): value}, checking the text format: every
    sample belongs to a family declared by # HELP and # TYPE first."""
    samples, types = {}, {}
    assert text.endswith('\n')
    for line in text.splitlines():
        if line.startswith('# HELP '):
            continue
        if line.startswith('# TYPE '):
            _, _, name, kind = line.split(' ')
            assert kind in ('gauge', 'counter', 'histogram')
            assert name not in types, 'family %s declared twice' % name
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, line
        name, _, labels, value = m.groups()
        family = re.sub(r'_(bucket|sum|count)$', '', name) \
            if re.sub(r'_(bucket|sum|count)$', '', name) in types else name
        assert family in types, 'sample before its # TYPE: %s' % line
        if types[family] == 'counter':
            assert name.endswith('_total'), name
        key = (name, frozenset(LABEL.findall(labels or '')))
        assert key not in samples, 'sample twice: %s' % line
        samples[key] = float(value)
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_metrics_are_the_prometheus_text_format():
    agent = StandIn()
    agent.metrics.decided('web', 'start')
    agent.metrics.decided('web', 'start')
    agent.metrics.moved('web', 'switch', 1.5)
    for seconds in (0.002, 0.004, 0.3):
        agent.metrics.renewed(seconds)
    samples = parse(exposition(agent))
    assert value(samples, 'slaposha_service_owner', service='web') == 1
    assert value(samples, 'slaposha_service_owner_token', service='web') == 12
    assert value(samples, 'slaposha_lease_remaining_seconds') == 2.25
    assert value(samples, 'slaposha_decisions_total', service='web',
                 action='start') == 2
    assert value(samples, 'slaposha_switches_total', service='web') == 1
    assert value(samples, 'slaposha_takeovers_total', service='web') == 0
    assert value(samples, 'slaposha_move_duration_seconds', service='web',
                 kind='switch') == 1.5
    assert value(samples, 'slaposha_resource_state', service='web',
                 resource='app#main', state='up') == 1
    assert value(samples, 'slaposha_resource_state', service='web',
                 resource='app#main', state='down') == 0
    # The histogram is cumulative and ends with +Inf = count.
    assert value(samples, 'slaposha_lease_renew_seconds_bucket',
                 le='0.0025') == 1
    assert value(samples, 'slaposha_lease_renew_seconds_bucket',
                 le='0.005') == 2
    assert value(samples, 'slaposha_lease_renew_seconds_bucket',
                 le='+Inf') == 3
    assert value(samples, 'slaposha_lease_renew_seconds_count') == 3
    # On a standby: not the owner, eligible.
    standby = parse(exposition(StandIn(host='hB')))
    assert value(standby, 'slaposha_service_owner', service='web') == 0
    assert value(standby, 'slaposha_service_owner_token', service='web') == 12
    assert value(standby, 'slaposha_service_eligible', service='web') == 1


class _Volume(object):
    retention = None

    def __init__(self, created):
        self.created = created

    def snapshots(self):
        return [type('Snapshot', (), {'name': n}) for n in self.created]

    def meta(self, name):
        return {'created': self.created[name]}


def test_backup_metrics_on_every_host_that_holds_a_copy():
    agent = StandIn(host='hB')
    now = time.time()
    res = type('Res', (), {'rid': 'btrfs#data', 'volume': _Volume({
        '000007-12': now - 7200, '000009-12': now - 60,
        '000010-12': None})})
    app = type('Res', (), {'rid': 'app#main', 'volume': None})
    service = type('Service', (), {'resources': [app, res],
                                   'data': staticmethod(lambda: [])})
    agent.slots = {'web': type('Slot', (), {'service': service})}
    samples = parse(exposition(agent))
    assert value(samples, 'slaposha_backup_snapshots', service='web',
                 resource='btrfs#data') == 3
    assert 7199 <= value(samples, 'slaposha_backup_oldest_age_seconds',
                         service='web', resource='btrfs#data') <= 7300
    assert value(samples, 'slaposha_backup_snapshots', service='web',
                 resource='app#main') is None


def test_every_metric_is_documented():
    with open(os.path.join(TOP, 'docs', 'metrics.rst')) as f:
        doc = f.read()
    agent = StandIn()
    agent.metrics.moved('web', 'takeover', 2.0)
    names = set(re.findall(r'^# TYPE (\S+)', exposition(agent), re.M))
    from slaposha import metrics
    with open(metrics.__file__) as f:
        names |= set(re.findall(r"'(slaposha_[a-z_]+)'", f.read()))
    missing = [n for n in sorted(names) if '``%s``' % n not in doc]
    assert not missing


# -- the plain health port --------------------------------------------------------

class _Cluster(object):
    path = 'cluster.cfg'

    class api(object):
        health_port = None
        health_listen = None
        max_connections = 64
        max_client_connections = 8
        request_timeout = 10.0

    hosts = {'hA': type('Host', (), {'address': '127.0.0.1'})}


def test_health_port_answers_the_checks_and_nothing_else():
    agent = StandIn()
    health = HealthApi(agent, _Cluster(), 'hA', port=0).start()
    try:
        url = health.url
        r = requests.get(url + '/health/owner/web', timeout=5)
        assert (r.status_code, r.text) == (200, 'web: runs on hA (token 12)\n')
        assert r.headers['Content-Type'].startswith('text/plain')
        r = requests.get(url + '/health/standby/web', timeout=5)
        assert r.status_code == 503
        assert r.text == 'web: hA is the owner, not a standby\n'
        assert requests.head(url + '/health/owner/web',
                             timeout=5).status_code == 200
        agent.owner = 'hB'
        assert requests.get(url + '/health/owner/web',
                            timeout=5).status_code == 503
        r = requests.get(url + '/health/standby/web', timeout=5)
        assert r.status_code == 200 and 'eligible standby' in r.text
        assert 'btrfs#data copy 0.8 s old' in r.text
        agent.ineligible = ['btrfs#data: data too stale']
        r = requests.get(url + '/health/standby/web', timeout=5)
        assert r.status_code == 503 and 'data too stale' in r.text
        agent.valid = False
        r = requests.get(url + '/health/standby/web', timeout=5)
        assert r.status_code == 503 and 'holds no lease' in r.text
        # Nothing else: no status, no other route, no other method.
        for path in ('/status', '/metrics', '/health/owner/nope',
                     '/health/owner/', '/../etc/passwd'):
            r = requests.get(url + path, timeout=5)
            assert r.status_code == 404, path
            assert r.text.count('\n') == 1
        r = requests.post(url + '/health/owner/web', timeout=5)
        assert r.status_code == 405
        assert ask(('127.0.0.1', health.port), b'GARBAGE\r\n\r\n').startswith(
            b'HTTP/1.0 400 ')
        assert requests.get(url + '/health/owner/web',
                            timeout=5).status_code == 503
    finally:
        health.stop()


def test_mon_frame_names_owner_standby_and_takeovers():
    status = {
        'cluster': 'c', 'host': 'hB', 'etcd': 'ok',
        'local': {'time': time.time(), 'lease': {'valid': True,
                                                 'time_left': 2.1},
                  'services': {'web': {'lags': {'btrfs#data': 0.7}}}},
        'hosts': {'hA': {'alive': True, 'role': 'host',
                         'address': '10.0.0.1'},
                  'hB': {'alive': True, 'role': 'host',
                         'address': '10.0.0.2'},
                  'hW': {'alive': False, 'role': 'witness'}},
        'etcd_members': [
            {'name': 'hA', 'endpoint': 'https://10.0.0.1:2379',
             'reachable': True, 'leader': False, 'version': '3.5.16',
             'raft_term': 3},
            {'name': 'hW', 'endpoint': 'https://10.0.0.3:2379',
             'reachable': False, 'error': 'no answer'}],
        'services': {'web': {
            'owner': 'hA', 'token': 40, 'hosts': ['hA', 'hB'],
            'resources': [['app#main', 'up', '1 process(es)']],
            'on': {'hA': {'state': 'running',
                          'decision': [time.time(), 'start', 'took it']},
                   'hB': {'state': 'stopped',
                          'decision': [time.time(), 'standby',
                                       'hA owns it']}}}}}
    history = [{'service': 'web', 'kind': 'takeover', 'from': 'hB',
                'to': 'hA', 'token': 40, 'running': time.time(),
                'duration': 0.42}]
    lines = frame(status, history)
    # The verdict under the title: what is wrong and where.
    assert lines[1] == '! 1 problem(s): etcd member hW out of reach: no answer'
    text = '\n'.join(lines)
    assert 'web        up       owner hA token 40' in text
    assert re.search(r'hA +owner +running .* start: took it', text)
    assert re.search(r'hB +eligible +stopped .*standby: hA owns it'
                     r'.*\[btrfs#data 0.7 s old\]', text)
    assert 'hW       UNREACHABLE  no answer' in text
    assert 'takeover hB -> hA  token 40  0.42 s' in text


# -- in the lab -------------------------------------------------------------------

# Runs in a host: GET a URL (https with the client certificate of CERTS),
# prints {"status", "body"}.
GET = textwrap.dedent('''\
    import json, sys, requests
    url, certs = sys.argv[1], sys.argv[2]
    r = requests.get(url, timeout=10, verify=certs + '/ca.crt',
                     cert=(certs + '/operator.crt', certs + '/operator.key'))
    print(json.dumps({'status': r.status_code, 'body': r.text}))
''')

def guest_files(lc, folder):
    """A guest certificate of the lab's CA, as a client keeps it."""
    ssl_dir = os.path.join(lc.config_dir, 'ssl')
    ca_key = pki.load_key(os.path.join(ssl_dir, 'ca.key'))
    ca_cert = pki.load_cert(os.path.join(ssl_dir, 'ca.crt'))
    key = pki.new_key()
    cert = pki.issue(ca_key, ca_cert, key.public_key(), 'prometheus',
                     'guest', days=1)
    os.makedirs(folder, exist_ok=True)
    pki.write_key(os.path.join(folder, 'operator.key'), key, overwrite=True)
    pki.write_cert(os.path.join(folder, 'operator.crt'), cert)
    shutil.copy(os.path.join(ssl_dir, 'ca.crt'), folder)
    return folder


class View(object):
    """Reads the agents' HTTPS API and health port from inside hW."""

    def __init__(self, lc, certs):
        self.lc = lc
        self.certs = certs
        self.script = os.path.join(lc.lab.workdir, 'get.py')
        with open(self.script, 'w') as f:
            f.write(GET)

    def get(self, url):
        p = self.lc.lab['hW'].run([sys.executable, self.script, url,
                                   self.certs], env=self.lc.env())
        return json.loads(p.stdout.strip().splitlines()[-1])

    def api(self, host, route):
        return self.get('https://%s:1215%s' % (self.lc.lab[host].address,
                                               route))

    def metrics(self, host):
        answer = self.api(host, '/metrics')
        assert answer['status'] == 200, answer
        return parse(answer['body'])

    def health(self, host, kind):
        answer = self.get('http://%s:8008/health/%s/web' % (
            self.lc.lab[host].address, kind))
        return answer['status'], answer['body']

    def history(self, host):
        return json.loads(self.api(host, '/history')['body'])['history']


@pytest.mark.lab
def test_metrics_health_mon_and_page_follow_a_switch_and_a_takeover(
        make_lab, monkeypatch, tmp_path):
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, services={
        'web': '''
            [service]
            hosts = hA hB
            [app#main]
            command = exec sleep %s
        ''' % marker}, settings='''
        [agent]
        monitor_interval = 0.5
        [api]
        health_port = 8008
        ''').start()
    certs = guest_files(lc, str(tmp_path / 'guest'))
    monkeypatch.setenv('SLAPOSHA_CERT_DIR', certs)
    view = View(lc, certs)
    observer = Observer(lab, marker).start()
    try:
        observer.wait_running('hA', 30)
        _, first = lc.wait_owner('web', 'hA')

        def metrics_say(host, owner):
            def check():
                m = view.metrics(host)
                return m if value(m, 'slaposha_service_owner',
                                  service='web') == owner else None
            return wait_for(check, 10, interval=0.3,
                            what='%s metrics owner=%d' % (host, owner))
        m = metrics_say('hA', 1)
        assert value(m, 'slaposha_service_owner_token', service='web') == first
        assert value(m, 'slaposha_service_running', service='web') == 1
        assert value(m, 'slaposha_lease_valid') == 1
        assert 0 < value(m, 'slaposha_lease_remaining_seconds') <= 3
        # The first renewal comes a second after the lease was granted.
        wait_for(lambda: value(view.metrics('hA'),
                               'slaposha_lease_renew_seconds_count') >= 1,
                 5, interval=0.3, what='a lease renewal counted')
        assert value(m, 'slaposha_decisions_total', service='web',
                     action='start') == 1
        assert value(m, 'slaposha_resource_state', service='web',
                     resource='app#main', state='up') == 1
        m = metrics_say('hB', 0)
        assert value(m, 'slaposha_service_owner_token', service='web') == first
        assert value(m, 'slaposha_service_eligible', service='web') == 1
        assert view.health('hA', 'owner')[0] == 200
        assert view.health('hB', 'owner') == (
            503, 'web: not owned by hB (owner: hA)\n')
        assert view.health('hB', 'standby')[0] == 200
        assert view.health('hA', 'standby')[0] == 503
        out = lc.cli('hW', '--api', 'hB', 'mon', '--once').stdout
        assert 'owner hA token %d' % first in out
        assert re.search(r'\n +hB +eligible +stopped', out), out

        # A planned switch: ownership flips, the new owner counts it.
        lc.cli('hA', 'switch', 'web', '--to', 'hB')
        _, second = lc.wait_owner('web', 'hB', not_host='hA')
        assert second > first
        m = metrics_say('hB', 1)
        assert value(m, 'slaposha_switches_total', service='web') == 1
        assert value(m, 'slaposha_takeovers_total', service='web') == 0
        assert value(m, 'slaposha_service_owner_token',
                     service='web') == second
        assert 0 < value(m, 'slaposha_move_duration_seconds', service='web',
                         kind='switch') < 10
        m = metrics_say('hA', 0)
        assert value(m, 'slaposha_switches_total', service='web') == 0
        assert value(m, 'slaposha_decisions_total', service='web',
                     action='switch') == 1
        assert view.health('hB', 'owner')[0] == 200
        assert view.health('hA', 'owner')[0] == 503
        wait_for(lambda: view.health('hA', 'standby')[0] == 200, 5,
                 interval=0.3, what='hA an eligible standby')
        assert view.health('hB', 'standby')[0] == 503
        moves = view.history('hA')
        assert [(e['kind'], e['from'], e['to'], e['token'])
                for e in moves] == [('switch', 'hA', 'hB', second)]
        out = lc.cli('hA', 'mon', '--once').stdout   # the local socket
        assert 'owner hB token %d' % second in out
        assert re.search(r'\n +hA +eligible +stopped', out), out
        assert re.search(r'switch +hA -> hB  token %d' % second, out), out

        # The owner crashes: hA takes it over and counts a takeover.
        lab.crash('hB')
        _, third = lc.wait_owner('web', 'hA', not_host='hB')
        assert third > second
        observer.wait_running('hA', 15)
        m = metrics_say('hA', 1)
        assert value(m, 'slaposha_takeovers_total', service='web') == 1
        assert value(m, 'slaposha_switches_total', service='web') == 0
        assert value(m, 'slaposha_service_owner_token', service='web') == third
        assert view.health('hA', 'owner')[0] == 200
        moves = wait_for(lambda: (lambda h: h if len(h) == 2 else None)(
            view.history('hA')), 5, interval=0.3, what='the takeover kept')
        kind, frm, to, token = (moves[-1][k] for k in
                                ('kind', 'from', 'to', 'token'))
        assert (kind, frm, to, token) == ('takeover', 'hB', 'hA', third)
        assert 0 < moves[-1]['duration'] < 10
        out = lc.cli('hA', 'mon', '--once').stdout
        assert 'owner hA token %d' % third in out
        assert re.search(r'\n +hB +DOWN', out), out

        page_in_chromium(lc, certs, str(tmp_path), third)
        check_no_overlap(observer)
    finally:
        observer.stop()
        for host in lc.hosts:
            lc.stop_agent(host)
    p = lc.cli('hA', 'mon', '--once', check=False)
    assert p.returncode == 2 and p.stderr.count('\n') == 1
    assert 'no agent answers' in p.stderr


def page_in_chromium(lc, certs, tmp, token):
    """The status page of hA as headless Chromium renders it, live: the
    browser has no client certificate, so it goes through a relay in hW that
    adds the guest one; it waits until the page says "live" and shows the
    history."""
    if shutil.which('chromium') is None:
        pytest.skip('no chromium (tools/setup.sh installs it)')
    host = lc.lab['hW']
    proc = relay(host, 8443, lc.lab['hA'].address, 1215, certs, lc.env())
    try:
        with Browser(host, 'http://127.0.0.1:8443/ui', lc.lab.workdir,
                     env=lc.env(), size='1000,820') as browser:
            browser.wait("document.getElementById('live').textContent ==="
                         " 'live' && !!document.querySelector("
                         "'[data-kind=takeover]')")
            dom = browser.dom()
            shot = browser.shot(os.path.join(tmp, 'status-page.png'))
    finally:
        proc.kill()
        proc.wait()
    assert 'data-service="web" data-owner="hA" data-token="%d"' % token \
        in dom, dom[-3000:]
    assert 'data-host="hB" data-state="DOWN"' in dom
    assert 'data-kind="switch"' in dom
    assert 'data-member="hW"' in dom
    with open(shot, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    if os.environ.get('SLAPOSHA_SCREENSHOT'):
        # Refreshed on request only: docs/status-page.png is committed.
        shutil.copy(shot, SCREENSHOT)
