"""The slaposha software release ordered from a real SlapOS master.

slaposha's own software release, built from a wheel of this checkout into
the node install, is supplied and requested on the real slapproxy (hM) and
deployed on node hA by the real `slapos node software` and `slapos node
instance`: a witness (software type ``witness``) and an agent (``default``),
each in a partition, run by the partition's supervisord as the partition's
user. The test reads the connection parameters from the master as a client
would and finds the agent's HTTPS API and the witness's etcd answering at
the published URLs, with certificates of the cluster CA.

The agent of an ordinary partition is not root: it serves its API and its
status, says in one line that it cannot run services, and never takes the
owner key of one (software/README.rst says what a node host needs).
"""

import glob
import json
import os
import shutil
import sys
import time
import zipfile

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import TOP, make_test_pki
from slaposha.lab.slapos import (
    NODE, deploy_node, node_install, partition_address, request,
    route_partitions, slapgrid, slaposha_release)

pytestmark = pytest.mark.lab

NOBODY = 65534
# The partitions' addresses on hA (format gives slappartN the address N):
# the agent of hA and the witness hW; hB, a host not deployed here, makes
# the hosts two (with hW, three etcd members: two keep the quorum).
ADDRESSES = {'hA': partition_address(0), 'hW': partition_address(1),
             'hB': partition_address(2)}
SSL_DIR = '/etc/opt/slapos/slaposha-ssl'
# etcd without TLS (the API has it, from ssl_dir): the two members are
# partitions of one host here, so the kernel connects them from the
# destination's own address, and etcd 3.4 refuses a peer whose certificate
# does not name the address it connects from.
CLUSTER = {'cluster-name': 'lab',
           'hosts': 'hA=%(hA)s hB=%(hB)s' % ADDRESSES,
           'witnesses': 'hW=%(hW)s' % ADDRESSES,
           'ssl-dir': SSL_DIR}
SERVICE = '''[service]
hosts = hA hB
[app#main]
command = exec sleep 86400
'''

# Run in hM, the master's host, as a client of the published URLs.
CLIENT = '''
import json, sys, requests
api, etcd, folder = sys.argv[1:]
cert = (folder + '/tester.crt', folder + '/tester.key')
ca = folder + '/ca.crt'
found = {}
for name, url in (('status', api + '/status'), ('health', etcd + '/health')):
    try:
        found[name] = requests.get(url, cert=cert, verify=ca, timeout=3).json()
    except Exception as e:
        found[name] = {'error': str(e)}
print(json.dumps(found))
'''


def make_pki(folder, lab):
    """The cluster's CA and host certificates, an operator's certificate
    for the test (tester) in ``folder``; the files of hA and hW in hA's
    SSL_DIR, readable by the partitions' user only."""
    from slaposha import pki
    make_test_pki(folder, ADDRESSES)
    ca_key = pki.load_key(os.path.join(folder, 'ca.key'))
    ca_cert = pki.load_cert(os.path.join(folder, 'ca.crt'))
    key = pki.new_key()
    pki.write_key(os.path.join(folder, 'tester.key'), key, overwrite=True)
    pki.write_cert(os.path.join(folder, 'tester.crt'), pki.issue(
        ca_key, ca_cert, key.public_key(), 'tester', 'operator', days=1))
    ssl = lab['hA'].path(SSL_DIR)
    os.makedirs(ssl, mode=0o700)
    for name in ('ca.crt', 'hA.crt', 'hA.key', 'hW.crt', 'hW.key'):
        shutil.copy2(os.path.join(folder, name), ssl)  # keys stay 0600
    for path in [ssl] + [os.path.join(ssl, n) for n in os.listdir(ssl)]:
        os.chown(path, NOBODY, NOBODY)


def client(lab, api, etcd, folder):
    env = dict(os.environ, PYTHONPATH=TOP)
    return json.loads(lab['hM'].run([sys.executable, '-c', CLIENT, api, etcd,
                                     folder], env=env).stdout)


def test_slapos_deploys_a_witness_and_an_unprivileged_agent(make_lab,
                                                            tmp_path):
    began = time.monotonic()
    lab = make_lab(['hA', 'hM'], shared={NODE: node_install()})
    url = slaposha_release()
    wheel, = glob.glob(os.path.join(lab.shared[NODE], 'sr', 'slaposha',
                                    'wheels', 'slaposha-*.whl'))
    names = zipfile.ZipFile(wheel).namelist()
    # The agent reads its status page at start (slaposha.api.https).
    assert 'slaposha/api/ui.html' in names, \
        'the slaposha wheel lacks slaposha/api/ui.html (setup.py package_data)'
    # The lab's software releases are test fixtures (tests/sr).
    assert not [n for n in names if 'recordstore' in n], names
    folder = str(tmp_path / 'pki')
    make_pki(folder, lab)
    agent = dict(CLUSTER, host='hA', **{'service-name': 'node',
                                        'service': SERVICE})
    witness = dict(CLUSTER, host='hW')
    proxy = deploy_node(lab, 'hA', 'hM', others=(), partitions=2, title='hA',
                        software=url, parameters=agent)
    try:
        request(lab, 'hM', 'hW', url, 'witness', witness)
        slapgrid(lab['hA'], 'node', 'instance')
        route_partitions(lab['hM'])
        api = 'https://%s:1215' % ADDRESSES['hA']
        etcd = 'http://%s:2379' % ADDRESSES['hW']

        def answering():
            found = client(lab, api, etcd, folder)
            return found['health'].get('health') == 'true' and \
                found['status'].get('etcd') == 'ok' and found
        try:
            wait_for(answering, 60, interval=1,
                     what='the agent and the witness answering')
        except Exception:
            print(client(lab, api, etcd, folder))
            print(lab['hA'].run('head -n 12 /srv/slapgrid/slappart*/.*.log;'
                                ' grep -h "warn\\|error" /srv/slapgrid/'
                                'slappart*/srv/slaposha/etcd.log | tail -n 8',
                                check=False).stdout)
            raise
        # Buildout again, now that the agent answers: its status is what
        # the partition publishes.
        slapgrid(lab['hA'], 'node', 'instance', '--force')

        published = request(lab, 'hM', 'hA', url, None, agent)
        assert published['api-url'] == api
        assert (published['cluster'], published['host']) == ('lab', 'hA')
        assert published['config-file'].endswith('/etc/slaposha/cluster.cfg')
        assert published['status'] == (
            'cluster lab seen from hA: node down; this agent runs as uid'
            ' %d, not root: cannot run services that need root (cgroups,'
            ' addresses, mounts); serves its API and status only' % NOBODY), \
            published['status']
        published_witness = request(lab, 'hM', 'hW', url, 'witness', witness)
        assert published_witness['etcd-url'] == etcd
        assert published_witness['status'] == \
            'witness hW: etcd member at %s' % etcd

        # The agent answers at the published URL (the operator's
        # certificate of the cluster CA), and so does the witness's etcd.
        found = client(lab, published['api-url'],
                       published_witness['etcd-url'], folder)
        assert found['health']['health'] == 'true'
        status = found['status']
        reason = status['local']['cannot_run']
        assert reason.startswith('runs as uid %d, not root' % NOBODY)
        assert status['hosts']['hA']['cannot_run'] == reason
        # Never an owner key it cannot honour, and it says why.
        node = status['services']['node']
        assert node['owner'] is None
        assert node['on']['hA']['decision'][1:] == [
            'ineligible', 'this host may not take it over: %s' % reason]
        # Not crashing: supervisord kept the same agent running, and it
        # said it once.
        out = slapgrid(lab['hA'], 'node', 'status').stdout
        lines = [line for line in out.splitlines() if 'slaposha' in line]
        assert len(lines) == 2 and all('RUNNING' in line for line in lines), \
            out
        log = lab['hA'].run('cat /srv/slapgrid/slappart*/.*slaposha-agent*'
                            '.log').stdout
        assert log.count('agent hA runs as uid %d' % NOBODY) == 1, log
        print('\nslaposha deployed by slapgrid, agent and witness answering:'
              ' %.1f s' % (time.monotonic() - began))
    finally:
        proxy.terminate()
        proxy.wait(10)
