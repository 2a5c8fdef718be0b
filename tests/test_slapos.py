"""A SlapOS node's partitions restarted on a peer without buildout: the
node model read from what a real `slapos node format` wrote (against a real
slapproxy master), the preflight check of a standby, the `slapos` driver
moving addresses, the instance supervisord and the partition's programs,
and the agents doing it on a crash (see slaposha.lab.slapos for the node).

Until the replication driver is wired in, the tests keep the data in step
themselves (rsync -aHAX --numeric-ids, which keeps the mtimes of
.timestamp). A test where slapgrid itself deploys a software release (`slapos
node software` and `instance`) is still to come."""

import json
import os
import sys
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.slapos import (
    answer, copy_node, make_node, partition_address, route_partitions,
    slapos_command as slapos_cmd)

from conftest import TOP
from test_resources import drive

pytestmark = pytest.mark.lab

slapos_core = pytest.importorskip('slapos.grid.svcbackend',
                                  reason='slapos.core is not installed')

PART4, PART6 = partition_address(0), partition_address(0, 6)
SERVICE = '[slapos#node]\n'


@pytest.fixture
def node(make_lab):
    lab = make_lab(['hA', 'hB', 'hM', 'hO'])
    proxy = make_node(lab, 'hA', 'hM')
    route_partitions(lab['hO'])
    yield lab
    proxy.terminate()


def test_node_model_from_a_formatted_node(node):
    lab = node
    facts = json.loads(lab['hA'].run([sys.executable, '-c', '''
import json
from slaposha.slapos.node import load_node, fingerprint
n = load_node()
p = n.partitions()[0]
print(json.dumps({"ids": [p.id for p in n.partitions()],
                  "addresses": n.addresses(), "started": p.started,
                  "uid": p.uid, "fingerprint": fingerprint(n)}))
'''], env=dict(os.environ, PYTHONPATH=TOP)).stdout)
    assert facts['ids'] == ['slappart0']
    assert [PART4, 32, 'lab0'] in facts['addresses']
    assert [PART6, 64, 'lab0'] in facts['addresses']
    assert facts['started'] is True and facts['uid'] == 65534
    assert facts['fingerprint']['users']['nobody'] == [65534, 65534]
    assert facts['fingerprint']['instance_root'] == '/srv/slapgrid'


def test_partitions_move_to_the_peer_without_buildout(node):
    lab = node
    a, b = lab['hA'], lab['hB']
    assert drive(a, SERVICE, 'slapos#node', 'start') is None
    wait_for(lambda: answer(lab) == 'partition data', 15,
             what='partition answering from hA')
    status = drive(a, SERVICE, 'slapos#node', 'status')
    assert status[0] == 'up', status
    stamp = os.stat(a.path('/srv/slapgrid/slappart0/.timestamp')).st_mtime
    # format routed the partition's IPv6 range to hA.
    with open(a.path('/srv/slapgrid/slappart0/.slapos-resource')) as f:
        network = json.load(f)['ipv6_range']['network']
    route = 'local %s dev lo' % network

    def routed(host):
        return route in host.run(['ip', '-6', 'route', 'show', 'table',
                                  'local']).stdout
    assert routed(a)
    # Stop on hA (the old owner), then the peer takes over.
    assert drive(a, SERVICE, 'slapos#node', 'stop') is None
    assert PART4 not in a.run(['ip', 'addr']).stdout
    assert not routed(a)  # the range goes with the node
    assert answer(lab) is None
    copy_node(lab, 'hA', 'hB')
    began = time.monotonic()
    assert drive(b, SERVICE, 'slapos#node', 'start') is None
    wait_for(lambda: answer(lab) == 'partition data', 15,
             what='partition answering from hB')
    print('partition answered from hB %.2f s after start'
          % (time.monotonic() - began))
    assert PART4 in b.run(['ip', 'addr']).stdout
    assert routed(b)
    assert 'tentative' not in b.run(['ip', '-6', 'addr']).stdout
    # The program runs in hB, as the partition's user; no buildout ran.
    procs = b.run(['ps', '-o', 'user=,args=', '-u', 'nobody']).stdout
    assert 'http.server --bind %s' % PART4 in procs
    assert not os.path.exists(b.path('/srv/slapgrid/slappart0/.installed.cfg'))
    assert os.stat(b.path('/srv/slapgrid/slappart0/.timestamp')).st_mtime \
        == stamp
    # The new owner's scheduled `slapos node format` keeps the partitions'
    # addresses (pinned definition, IPv6 in the interface's prefix).
    resource = b.path('/srv/slapgrid/slappart0/.slapos-resource')
    with open(resource) as f:
        before = json.load(f)['address_list']
    slapos_cmd(b, 'node', 'format', '--now')
    with open(resource) as f:
        assert json.load(f)['address_list'] == before
    assert drive(b, SERVICE, 'slapos#node', 'stop') is None
    assert not routed(b)


def test_check_names_the_user_whose_uid_differs(node, tmp_path):
    lab = node
    env = dict(os.environ, PYTHONPATH=TOP)
    reference = lab['hA'].run([sys.executable, '-m', 'slaposha.cli.main',
                               'slapos', 'fingerprint'], env=env).stdout
    copy_node(lab, 'hA', 'hB')
    path = str(tmp_path / 'reference.json')
    with open(path, 'w') as f:
        f.write(reference)
    ok = lab['hB'].run([sys.executable, '-m', 'slaposha.cli.main', 'slapos',
                        'check', '--reference', path], env=env, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert 'eligible' in ok.stdout
    changed = json.loads(reference)
    changed['users']['nobody'] = [4242, 4242]
    with open(path, 'w') as f:
        json.dump(changed, f)
    bad = lab['hB'].run([sys.executable, '-m', 'slaposha.cli.main', 'slapos',
                         'check', '--reference', path], env=env, check=False)
    assert bad.returncode == 1
    assert 'user nobody has uid 65534 gid 65534 here but uid 4242 gid 4242' \
        ' on the owner' in bad.stdout
    assert 'not eligible' in bad.stdout


def test_agents_refuse_a_standby_with_another_uid_then_take_over(make_lab):
    """The node as a service of the agents: a standby whose slapuser has
    another uid is not eligible (status names the user) and does not take
    over when the owner crashes; once fixed, it takes over, with the master
    stopped, and the partition answers on the same address with its data,
    no buildout."""
    from slaposha.lab import HOST_PATHS
    from slaposha.lab.cluster import LabCluster
    lab = make_lab(['hA', 'hB', 'hW', 'hM', 'hO'],
                   paths=HOST_PATHS + ('/etc/passwd',))
    proxy = make_node(lab, 'hA', 'hM')
    route_partitions(lab['hO'])
    passwd = lab['hB'].path('/etc/passwd')
    with open(passwd) as f:
        good = f.read()
    with open(passwd, 'w') as f:
        f.write(good.replace('nobody:x:65534:65534', 'nobody:x:4242:4242'))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'node': """
        [service]
        hosts = hA hB
        [slapos#node]
    """}, settings="""
        [agent]
        monitor_interval = 0.5
    """).start()
    try:
        wait_for(lambda: answer(lab) == 'partition data', 30,
                 what='partition answering from hA')
        copy_node(lab, 'hA', 'hB')

        def hb_ineligible():
            out = lc.cli('hB', 'status', check=False).stdout
            return 'not eligible: node' in out and out
        tree = wait_for(hb_ineligible, 15, interval=0.3,
                        what='hB shown as not eligible')
        assert 'user nobody has uid 4242 gid 4242 here but uid 65534 gid' \
            ' 65534 on the owner' in tree
        refused = lc.cli('hB', 'takeover', 'node', check=False)
        assert refused.returncode == 2
        assert 'hB may not run node' in refused.stderr
        # The master is gone too during the takeover: nothing needs it.
        proxy.terminate()
        proxy.wait(10)
        lab.crash('hA')
        time.sleep(5)
        assert answer(lab) is None, 'an ineligible host took over'
        with open(passwd, 'w') as f:
            f.write(good)
        fixed = time.monotonic()
        wait_for(lambda: answer(lab) == 'partition data', 30,
                 what='partition answering from hB')
        print('hB took over %.2f s after it was fixed'
              % (time.monotonic() - fixed))
        assert PART4 in lab['hB'].run(['ip', 'addr']).stdout
        assert not os.path.exists(
            lab['hB'].path('/srv/slapgrid/slappart0/.installed.cfg'))
    finally:
        lc.stop_agent('hB')
        proxy.terminate()


def test_parameters_saved_by_the_owner_are_readable_without_the_master(
        node):
    lab = node
    env = dict(os.environ, PYTHONPATH=TOP)
    m = lab['hM']
    slapos_cmd(m, 'supply', '/opt/sr/recordsrv/software.cfg', 'COMP-LAB')
    slapos_cmd(m, 'request', 'records', '/opt/sr/recordsrv/software.cfg',
               '--parameters', 'greeting=Bonjour', 'port=8080')
    save = lab['hA'].run([sys.executable, '-m', 'slaposha.cli.main',
                          'slapos', 'save-parameters'], env=env)
    assert 'saved the parameters of COMP-LAB' in save.stdout
    saved = lab['hA'].path('/srv/slapgrid/.slaposha/parameters.json')
    assert oct(os.stat(saved).st_mode & 0o777) == '0o600'
    copy_node(lab, 'hA', 'hB')
    lab.crash('hM')  # the master is gone
    out = lab['hB'].run([sys.executable, '-m', 'slaposha.cli.main',
                         'slapos', 'partitions', '--json'], env=env).stdout
    part = json.loads(out)['partitions'][0]
    assert part['id'] == 'slappart0' and part['title'] == 'records'
    assert part['parameters'] == {'greeting': 'Bonjour', 'port': '8080'}
    assert part['software_release'] == '/opt/sr/recordsrv/software.cfg'
    assert '%s/32' % PART4 in part['addresses']
    text = lab['hB'].run([sys.executable, '-m', 'slaposha.cli.main',
                          'slapos', 'partitions'], env=env).stdout
    assert '    greeting = Bonjour' in text
    # Saving needs the master: one line, the saved copy is kept.
    failed = lab['hB'].run([sys.executable, '-m', 'slaposha.cli.main',
                            'slapos', 'save-parameters'], env=env,
                           check=False, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.count('\n') == 1
    assert 'the parameters saved before are kept' in failed.stderr
    assert json.loads(open(lab['hB'].path(
        '/srv/slapgrid/.slaposha/parameters.json')).read())['partitions']
