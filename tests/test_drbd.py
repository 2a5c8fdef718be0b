"""The drbd driver. This machine has no drbd kernel module: the commands
go to a recording runner, and the tests check the exact sequence and the
generated resource file. The integration test runs only where /proc/drbd
exists."""

import json
import os
import shutil
import subprocess
import textwrap

import pytest

from slaposha import config
from slaposha.cgroup import Cgroup
from slaposha.config import ConfigError
from slaposha.resources import DOWN, UP, WARN, ResourceError, driver
from slaposha.service import Context

SECTION = """
    [drbd#data]
    resource = slapgrid
    disk = /dev/vg0/slapgrid
    addresses = hA=10.0.0.1:7789 hB=10.0.0.2:7789
    witnesses = hW=10.0.0.3:7789
    config_dir = %s
"""

STATUS = {
    'name': 'slapgrid', 'node-id': 0, 'role': 'Primary', 'suspended': False,
    'devices': [{'volume': 0, 'minor': 0, 'disk-state': 'UpToDate',
                 'quorum': True}],
    'connections': [
        {'peer-node-id': 1, 'name': 'hB', 'connection-state': 'Connected',
         'peer-role': 'Secondary',
         'peer_devices': [{'volume': 0, 'replication-state': 'Established',
                           'peer-disk-state': 'UpToDate',
                           'percent-in-sync': 100.0}]},
        {'peer-node-id': 2, 'name': 'hW', 'connection-state': 'Connected',
         'peer-role': 'Secondary',
         'peer_devices': [{'volume': 0, 'replication-state': 'Established',
                           'peer-disk-state': 'Diskless'}]}]}


class FakeRunner(object):
    """Records every command; answers ``drbdsetup status`` from
    ``self.state`` (None: not up) and others from ``self.codes``."""

    def __init__(self, state=None):
        self.state = state
        self.calls = []
        self.spawned = []
        self.codes = {}

    def run(self, args, timeout):
        self.calls.append(' '.join(args))
        if args[:2] == ['drbdsetup', 'status']:
            if self.state is None:
                return 10, '', "slapgrid: No such resource"
            return 0, json.dumps([self.state]), ''
        code = self.codes.get(args[1], 0)
        if code == 0 and args[1] == 'up' and self.state is None:
            self.state = dict(STATUS, role='Secondary')
        if code == 0 and args[1] == 'primary':
            self.state['role'] = 'Primary'
        if code == 0 and args[1] == 'secondary':
            self.state['role'] = 'Secondary'
        return code, '', 'failed (%s)' % args[1] if code else ''

    def spawn(self, args):
        self.spawned.append(' '.join(args))
        return subprocess.Popen(['true'])


def make(tmp_path, state=None, extra=''):
    path = tmp_path / 'svc.cfg'
    text = textwrap.dedent(SECTION % (tmp_path / 'drbd.d'))
    for line in extra.splitlines():   # a key given replaces the default one
        key = line.split('=')[0].strip()
        text = '\n'.join(l for l in text.splitlines()
                         if l.split('=')[0].strip() != key) + '\n' + line
    path.write_text(text + '\n')
    section, = config.load_service(str(path)).resources
    res = driver('drbd')(section, Context('svc', Cgroup(str(tmp_path)),
                                          str(tmp_path)))
    res.runner = FakeRunner(state)
    return res


def test_resource_file_protocol_c_quorum_mesh(tmp_path):
    res = make(tmp_path)
    res.provision()
    with open(str(tmp_path / 'drbd.d' / 'slapgrid.res')) as f:
        text = f.read()
    assert text == textwrap.dedent('''\
        # Written by slaposha (resource drbd#data): edit the service file, not this.
        resource slapgrid {
            net {
                protocol C;
                after-sb-0pri disconnect;
                after-sb-1pri disconnect;
                after-sb-2pri disconnect;
            }
            options {
                quorum majority;
                on-no-quorum io-error;
            }
            on hA {
                node-id 0;
                address 10.0.0.1:7789;
                volume 0 {
                    device /dev/drbd0 minor 0;
                    disk /dev/vg0/slapgrid;
                    meta-disk internal;
                }
            }
            on hB {
                node-id 1;
                address 10.0.0.2:7789;
                volume 0 {
                    device /dev/drbd0 minor 0;
                    disk /dev/vg0/slapgrid;
                    meta-disk internal;
                }
            }
            on hW {
                node-id 2;
                address 10.0.0.3:7789;
                volume 0 {
                    device /dev/drbd0 minor 0;
                    disk none;
                    meta-disk internal;
                }
            }
            connection-mesh {
                hosts hA hB hW;
            }
        }
        ''')
    # A fresh disk: no metadata yet, so it is created, then up.
    res.runner.codes['dump-md'] = 255
    res.runner.state = None
    res.runner.calls = []
    res.provision()
    assert res.runner.calls == [
        'drbdsetup status --json slapgrid', 'drbdadm dump-md slapgrid',
        'drbdadm create-md --force slapgrid', 'drbdadm up slapgrid']
    # Already up: the file is applied, the metadata left alone.
    res.runner.calls = []
    res.provision()
    assert res.runner.calls == ['drbdsetup status --json slapgrid',
                                'drbdadm adjust slapgrid']


def test_start_up_then_primary_stop_secondary_fence_forced(tmp_path):
    res = make(tmp_path)
    assert res.status() == (DOWN, 'resource slapgrid is not up here')
    res.runner.calls = []
    res.start()
    assert res.runner.calls == [
        'drbdsetup status --json slapgrid', 'drbdadm up slapgrid',
        'drbdsetup status --json slapgrid', 'drbdadm primary slapgrid']
    state, message = res.status()
    assert state == UP, message
    assert message == 'Primary, disk UpToDate; hB: Connected, Established,' \
        ' peer disk UpToDate; hW: Connected, Established, peer disk Diskless'
    res.runner.calls = []
    res.start()   # up and Primary already: nothing to do
    assert res.runner.calls == ['drbdsetup status --json slapgrid']
    res.runner.calls = []
    res.stop()
    assert res.runner.calls == ['drbdsetup status --json slapgrid',
                                'drbdadm secondary slapgrid']
    assert res.status()[0] == DOWN
    res.runner.calls = []
    res.fence()
    assert res.runner.calls == [] and res.runner.spawned == [
        'drbdsetup secondary --force slapgrid']


def test_promote_refused_is_one_line(tmp_path):
    res = make(tmp_path, state=dict(STATUS, role='Secondary'))
    res.runner.codes['primary'] = 11
    with pytest.raises(ResourceError) as e:
        res.start()
    assert str(e.value) == 'drbd#data: promote failed: failed (primary)'


def test_status_says_what_is_wrong(tmp_path):
    lost = json.loads(json.dumps(STATUS))
    lost['devices'][0]['quorum'] = False
    lost['connections'][0]['connection-state'] = 'Connecting'
    res = make(tmp_path, state=lost)
    assert res.status() == (WARN, 'Primary, disk UpToDate, NO QUORUM;'
                            ' hB: Connecting; hW: Connected, Established,'
                            ' peer disk Diskless')
    syncing = json.loads(json.dumps(STATUS))
    syncing['connections'][0]['peer_devices'][0].update({
        'replication-state': 'SyncSource', 'peer-disk-state': 'Inconsistent',
        'percent-in-sync': 42.5})
    res.runner.state = syncing
    state, message = res.status()
    assert state == WARN and 'hB: Connected, SyncSource, peer disk' \
        ' Inconsistent, 42.5% in sync' in message


def test_bad_addresses_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        make(tmp_path, extra='addresses = hA=10.0.0.1\n')
    assert str(e.value).endswith("[drbd#data]: addresses: expected"
                                 " name=address:port, got 'hA=10.0.0.1'")
    with pytest.raises(ConfigError) as e:
        make(tmp_path, extra='on_no_quorum = freeze\n')
    assert 'on_no_quorum' in str(e.value) and 'io-error' in str(e.value)


@pytest.mark.skipif(not os.path.exists('/proc/drbd') or
                    shutil.which('drbdadm') is None or os.geteuid() != 0,
                    reason='needs the drbd kernel module (/proc/drbd),'
                    ' drbd-utils and root; this machine cannot load kernel'
                    ' modules (reference/replication.md 4b)')
def test_real_drbd_single_node_up_primary_secondary(tmp_path):
    import socket
    image = tmp_path / 'disk.img'
    subprocess.run(['truncate', '-s', '64M', str(image)], check=True)
    loop = subprocess.run(['losetup', '-f', '--show', str(image)], check=True,
                          stdout=subprocess.PIPE,
                          universal_newlines=True).stdout.strip()
    host = socket.gethostname()
    path = tmp_path / 'svc.cfg'
    path.write_text(textwrap.dedent('''
        [drbd#data]
        resource = slaposhatest
        disk = %s
        device = /dev/drbd199
        minor = 199
        addresses = %s=127.0.0.1:7999
    ''' % (loop, host)))
    section, = config.load_service(str(path)).resources
    res = driver('drbd')(section, Context('svc', Cgroup(str(tmp_path)),
                                          str(tmp_path)))
    try:
        res.provision()
        res.start()
        assert res.status()[0] == UP, res.status()
        res.stop()
        assert res.status()[0] == DOWN
    finally:
        subprocess.run(['drbdadm', 'down', 'slaposhatest'])
        os.unlink(res.path)
        subprocess.run(['losetup', '-d', loop])
