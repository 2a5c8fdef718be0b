"""A SlapOS compute node in the lab: a real slapproxy master, a real
`slapos node format`, partitions whose programs are in supervisord.conf.d.

Used by the SlapOS tests, the benchmarks and the demo::

    proxy = make_node(lab, 'hA', master='hM', partitions=10)

Partition N gets 10.213.1.(N+1)/32 and fd42:213::1:(N+1); partition 0
serves its data over HTTP on port 8080 (GET /who returns "partition data"),
the others run a light program. The instance supervisord configuration is
written by slapos.core's own createSupervisordConfiguration and each
partition's program file from slapos.core's own template, as `slapos node
instance` does after a buildout.
"""

import os
import subprocess
import sys

from slaposha.lab import wait_for
from slaposha.lab.web import get

__all__ = ['make_node', 'copy_node', 'partition_address', 'slapos_command',
           'answer', 'route_partitions']

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
COMPUTER = 'COMP-LAB'
PORT = 8080

SLAPOS_CFG = '''\
[slapos]
computer_id = %(computer)s
software_root = /opt/slapgrid
instance_root = /srv/slapgrid
master_url = http://%(master)s:18080
root_check = False
pidfile_software = /srv/slapgrid/var/run/slapgrid-sr.pid
pidfile_instance = /srv/slapgrid/var/run/slapgrid-cp.pid
pidfile_report = /srv/slapgrid/var/run/slapgrid-ur.pid
certificate_repository_path = /etc/opt/slapos/ssl/partition_pki

[slapformat]
input_definition_file = /etc/opt/slapos/slapformat-definition.cfg
computer_xml = /etc/opt/slapos/slapos.xml
partition_amount = %(count)d
alter_user = false
alter_network = true
interface_name = lab0
ipv6_interface = lab0
ipv4_local_network = 10.213.1.0/24
create_tap = false
create_tun = false

[slapproxy]
host = %(master)s
port = 18080
database_uri = /var/lib/slaposha/proxy.db
'''

MAKE_SUPERVISOR_FILES = '''
import logging, os, sys, pkg_resources
from slapos.grid.svcbackend import createSupervisordConfiguration
createSupervisordConfiguration('/srv/slapgrid', logging.getLogger(),
                               watchdog_command='/bin/true')
group = pkg_resources.resource_string('slapos.grid',
    'templates/group_partition_supervisord.conf.in').decode()
program = pkg_resources.resource_string('slapos.grid',
    'templates/program_partition_supervisord.conf.in').decode()
for n in range(int(sys.argv[1])):
    pid = 'slappart%d' % n
    part = '/srv/slapgrid/' + pid
    name = pid + '_service-on-watch'
    text = group % {'instance_id': pid, 'program_list': name}
    text += '\\n' + program % {
        'program_id': name, 'program_directory': part,
        'program_command': part + '/etc/service/service',
        'program_name': 'service-on-watch', 'instance_path': part,
        'user_id': 65534, 'group_id': 65534, 'USER': 'nobody',
        'HOME': '/nonexistent'}
    with open('/srv/slapgrid/etc/supervisord.conf.d/%s.conf' % pid, 'w') as f:
        f.write(text)
'''

HTTP_SERVICE = '''#!/bin/sh
exec python3 -m http.server --bind %s %d --directory %s
'''
IDLE_SERVICE = '''#!/bin/sh
exec sleep 1000000
'''


def partition_address(n, family=4):
    # IPv6 inside the hosts' /64: format keeps a partition's IPv6 only when
    # it lies in a prefix of the interface.
    return '10.213.1.%d' % (n + 1) if family == 4 else \
        'fd42:213::1:%x' % (n + 1)


def _env():
    return dict(os.environ, PYTHONPATH=TOP)


def slapos_command(host, *args, timeout=300):
    """Run the real `slapos` command of this environment in ``host``."""
    return host.run([os.path.join(os.path.dirname(sys.executable), 'slapos')]
                    + list(args) + ['--cfg', '/etc/opt/slapos/slapos.cfg'],
                    env=_env(), timeout=timeout)


def _definition(host, count):
    lines = ['[computer]',
             'address = %s/ffff:ffff:ffff:ffff::' % host.address6,
             'software_user = nobody', '']
    for n in range(count):
        lines += ['[partition_%d]' % n,
                  'address = %s/255.255.255.255 %s/ffff:ffff:ffff:ffff::' % (
                      partition_address(n), partition_address(n, 6)),
                  'user = nobody', 'pathname = slappart%d' % n,
                  'network_interface = lab0', '']
    return '\n'.join(lines)


def route_partitions(host):
    """Let a host outside the node reach the partitions' addresses on the
    lab's segment (they are outside its /24)."""
    host.run(['ip', 'route', 'replace', '10.213.1.0/24', 'dev', 'lab0'])


def make_node(lab, node='hA', master='hM', partitions=1, others=('hB',)):
    """Start slapproxy in ``master`` and format ``node`` with
    ``partitions`` started partitions; write the same slapos.cfg on the
    ``others`` (standbys). Returns the proxy's Popen."""
    m = lab[master]
    for name in (node, master) + tuple(others):
        host = lab[name]
        with open(host.path('/etc/opt/slapos/slapos.cfg'), 'w') as f:
            f.write(SLAPOS_CFG % {'computer': COMPUTER, 'master': m.address,
                                  'count': partitions})
        with open(host.path('/etc/opt/slapos/slapformat-definition.cfg'),
                  'w') as f:
            f.write(_definition(host, partitions))
    proxy = m.spawn([os.path.join(os.path.dirname(sys.executable), 'slapos'),
                     'proxy', 'start', '--cfg', '/etc/opt/slapos/slapos.cfg'],
                    name='slapproxy', env=_env())
    a = lab[node]
    wait_for(lambda: a.run(['python3', '-c', 'import urllib.request;'
                            'urllib.request.urlopen("http://%s:18080/")'
                            % m.address], check=False).returncode == 0, 30,
             what='slapproxy answering')
    a.run(['mkdir', '-p', '/srv/slapgrid/var/run'])
    slapos_command(a, 'node', 'format', '--now')
    for n in range(partitions):
        part = a.path('/srv/slapgrid/slappart%d' % n)
        os.makedirs(os.path.join(part, 'etc', 'service'))
        os.makedirs(os.path.join(part, 'srv'))
        service = os.path.join(part, 'etc', 'service', 'service')
        with open(service, 'w') as f:
            if n == 0:
                f.write(HTTP_SERVICE % (partition_address(0), PORT,
                                        '/srv/slapgrid/slappart0/srv'))
            else:
                f.write(IDLE_SERVICE)
        os.chmod(service, 0o755)
        with open(os.path.join(part, 'srv', 'who'), 'w') as f:
            f.write('partition data\n')
        with open(os.path.join(part, '.timestamp'), 'w') as f:
            f.write('1700000000.1\n')
        os.utime(os.path.join(part, '.timestamp'), (1700000000, 1700000000))
    a.run([sys.executable, '-c', MAKE_SUPERVISOR_FILES, str(partitions)],
          env=_env())
    for n in range(partitions):
        part = a.path('/srv/slapgrid/slappart%d' % n)
        subprocess.run(['chown', '-R', '65534:65534', part], check=True)
        os.chmod(part, 0o750)
    return proxy


def copy_node(lab, src, dst):
    """Keep a standby's data in step (until the data resource does it):
    rsync -aHAX --numeric-ids keeps owners and the mtimes of .timestamp."""
    for path in ('/srv/slapgrid', '/opt/slapgrid', '/etc/opt/slapos'):
        subprocess.run(['rsync', '-aHAX', '--numeric-ids', '--delete',
                        '--exclude', 'sv.sock',
                        lab[src].path(path) + '/', lab[dst].path(path) + '/'],
                       check=True)


def answer(lab, via='hO', timeout=1):
    """What partition 0 answers at its address, seen from ``via``."""
    return get(lab, via, 'http://%s:%d/who' % (partition_address(0), PORT),
               timeout)
