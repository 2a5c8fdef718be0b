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

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

from slaposha.lab import HOST_PATHS, LabError, wait_for
from slaposha.lab.web import get

__all__ = ['make_node', 'copy_node', 'partition_address', 'slapos_command',
           'answer', 'route_partitions', 'node_install', 'deploy_node',
           'slapgrid', 'NODE', 'SR_URL', 'post_record', 'records',
           'BTRFS_PATHS', 'btrfs_srv', 'post_records', 'request',
           'slaposha_release', 'SLAPOSHA_URL', 'node_address', 'CRON',
           'buildout_facts', 'COMPUTER_ADDRESS6', 'SR2_URL',
           'computer_address_on_master', 'node_service']

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
COMPUTER = 'COMP-LAB'
PORT = 8080

# The node's own SlapOS install, at the same path on every host as on real
# peers (a real node has it at /opt/slapos too). slapgrid runs buildout as
# the partition's user with the Python that runs slapgrid, so that Python
# must be readable by that user: a virtualenv of the machine's python3 in a
# folder of this checkout, bind-mounted at NODE in every lab host (the
# Lab's ``shared``). Pins: reference/slapos-internals.md sections 7 and 8
# (slapos.core 1.24.1 keeps `slapos node software/instance` on Python 3.11;
# recipes in the node's Python are found by upstream zc.buildout). The
# slaposha software release takes from it zc.recipe.egg (3.0.0 is the last
# for zc.buildout 4) and slaposha's dependencies, cryptography included
# (the others come with slapos.core): it compiles nothing.
NODE = '/opt/slapos'
NODE_SOURCE = os.path.join(TOP, '.lab', 'slapos-node')
NODE_PYTHON = '/usr/bin/python3'
NODE_REQUIREMENTS = ('slapos.core==1.24.1', 'setuptools<81',
                     'slapos.libnetworkcache==0.30', 'zc.buildout==4.2.0',
                     'slapos.recipe.template==5.1', 'zc.recipe.egg==3.0.0',
                     'cryptography==50.0.2')
# The lab's software releases are test fixtures of this checkout: the
# wheel does not carry them.
SR_SOURCE = os.path.join(TOP, 'tests', 'sr')
SR_URL = NODE + '/sr/recordstore/software.cfg'
# A second software release (another URL, so another folder of
# /opt/slapgrid; the same recordstore), for a node that gains one.
SR2_URL = NODE + '/sr/recordstore/second.cfg'
# slaposha's own software release, built from this checkout into the node
# install by slaposha_release().
SLAPOSHA_URL = NODE + '/sr/slaposha/software.cfg'

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
# the lab's disks are small (MB)
software_min_free_space = 16
instance_min_free_space = 16

[slapformat]
%(definition)scomputer_xml = /etc/opt/slapos/slapos.xml
partition_amount = %(count)d
partition_base_name = slappart
user_base_name = slapuser
tap_base_name = slaptap
alter_user = %(alter_user)s
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


# The computer's own address, the same on every host: a /64 of its own,
# so that `slapos node format` on whichever host holds it (the ``slapos``
# resource with computer_address) posts it to the master.
COMPUTER_ADDRESS6 = 'fd42:213:0:1::1'


def _definition(count):
    lines = ['[computer]',
             'address = %s/ffff:ffff:ffff:ffff::' % COMPUTER_ADDRESS6,
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


def _prepare(lab, node, master, partitions, others, slapos, usual=False):
    """slapos.cfg and the pinned definition on every host, slapproxy
    started in ``master`` with ``slapos``, ``node`` formatted. ``usual``:
    as a node installed the usual way, on ``node`` only: format chooses the
    addresses and creates the users (slapsoft, slapuserN)."""
    m = lab[master]
    for name in (node, master) + tuple(others):
        host = lab[name]
        with open(host.path('/etc/opt/slapos/slapos.cfg'), 'w') as f:
            f.write(SLAPOS_CFG % {
                'computer': COMPUTER, 'master': m.address,
                'count': partitions, 'alter_user': str(usual).lower(),
                'definition': '' if usual else 'input_definition_file = '
                '/etc/opt/slapos/slapformat-definition.cfg\n'})
        if usual:
            continue
        with open(host.path('/etc/opt/slapos/slapformat-definition.cfg'),
                  'w') as f:
            f.write(_definition(partitions))
    proxy = m.spawn([slapos, 'proxy', 'start', '--cfg',
                     '/etc/opt/slapos/slapos.cfg'], name='slapproxy',
                    env=_env())
    a = lab[node]
    wait_for(lambda: a.run(['python3', '-c', 'import urllib.request;'
                            'urllib.request.urlopen("http://%s:18080/")'
                            % m.address], check=False).returncode == 0, 30,
             what='slapproxy answering')
    a.run(['mkdir', '-p', '/srv/slapgrid/var/run'])
    a.run([slapos, 'node', 'format', '--now', '--cfg',
           '/etc/opt/slapos/slapos.cfg'], env=_env(), timeout=300)
    return proxy


def make_node(lab, node='hA', master='hM', partitions=1, others=('hB',)):
    """Start slapproxy in ``master`` and format ``node`` with
    ``partitions`` started partitions; write the same slapos.cfg on the
    ``others`` (standbys). Returns the proxy's Popen."""
    proxy = _prepare(lab, node, master, partitions, others, os.path.join(
        os.path.dirname(sys.executable), 'slapos'))
    a = lab[node]
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


def node_service(interval, more=''):
    """The service file of a node on hA and hB whose instance_root
    (/srv/slapgrid) is a btrfs subvolume sent every ``interval`` seconds;
    ``more``: lines after ``[slapos#node]`` (its keys, other sections)."""
    return textwrap.dedent('''\
        [service]
        hosts = hA hB
        [btrfs#slapgrid]
        volume = /srv/slapgrid
        interval = %g
        [slapos#node]
        ''') % interval + textwrap.dedent(more)


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


# -- the real slapgrid ---------------------------------------------------------

def node_install():
    """Build the node's SlapOS install once (about 30 s; again only when
    the pins change) and refresh the lab's software releases in it; returns
    the folder to share at NODE (``Lab(..., shared={NODE:
    node_install()})``). Concurrent callers wait for one build."""
    want = hashlib.sha256(repr((NODE_REQUIREMENTS, NODE_PYTHON)).encode(
        )).hexdigest()[:16]
    os.makedirs(os.path.dirname(NODE_SOURCE), exist_ok=True)
    with open(NODE_SOURCE + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = os.path.join(NODE_SOURCE, '.slaposha-node')
        try:
            with open(stamp) as f:
                have = f.read().strip()
        except OSError:
            have = None
        if have != want:
            _build_node_install(want, stamp)
        shutil.copytree(SR_SOURCE, os.path.join(NODE_SOURCE, 'sr'),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns(
                            '__pycache__', '*.pyc'))
        subprocess.run(['chmod', '-R', 'go+rX', os.path.join(
            NODE_SOURCE, 'sr')], check=True)
    return NODE_SOURCE


def _build_node_install(want, stamp):
    if not os.access(NODE_PYTHON, os.X_OK):
        raise LabError('%s is missing: the SlapOS node install needs the'
                       ' machine\'s python3 (apt-get install python3-venv)'
                       % NODE_PYTHON)
    shutil.rmtree(NODE_SOURCE, True)
    os.makedirs(NODE_SOURCE)
    os.chmod(NODE_SOURCE, 0o755)
    # Built where it runs (the scripts' first line names NODE), in a mount
    # namespace of its own: the machine's NODE is left as it was.
    made = not os.path.exists(NODE)
    if made:
        os.makedirs(NODE)
    try:
        script = ('umask 022 && mount --bind %s %s && %s -m venv %s && '
                  '%s/bin/pip install -q --disable-pip-version-check %s' % (
                      NODE_SOURCE, NODE, NODE_PYTHON, NODE, NODE,
                      ' '.join("'%s'" % r for r in NODE_REQUIREMENTS)))
        p = subprocess.run(['unshare', '--mount', '--propagation', 'private',
                            'sh', '-c', script], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
    finally:
        if made:
            try:
                os.rmdir(NODE)
            except OSError:
                pass
    if p.returncode:
        raise LabError('cannot build the SlapOS node install in %s: %s' % (
            NODE_SOURCE, p.stdout.strip()[-800:]))
    with open(stamp, 'w') as f:
        f.write(want + '\n')


def slapgrid(host, *args, timeout=300, check=True):
    """Run the node's own `slapos` (NODE/bin/slapos) in ``host``, as cron
    would: a plain environment."""
    env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'HOME': '/root',
           'LANG': 'C.UTF-8'}
    return host.run([NODE + '/bin/slapos'] + list(args) + [
        '--cfg', '/etc/opt/slapos/slapos.cfg'], env=env, timeout=timeout,
        check=check)


def deploy_node(lab, node='hA', master='hM', others=('hB',), partitions=1,
                title='records', software=SR_URL, software_type=None,
                parameters=None, usual=False):
    """A SlapOS node deployed by SlapOS itself: slapproxy in ``master``, the
    real `slapos node format`, then ``software`` (by default recordstore,
    SR_URL) supplied, requested as ``title`` (with ``software_type`` and
    ``parameters``, see :func:`request`) and built and instantiated by the
    real `slapos node software` and `slapos node instance` (buildout runs
    as the partition's user). The lab must share NODE
    (:func:`node_install`). ``usual``: installed as a node usually is, in a
    lab whose hosts have /etc of their own (``Lab(layers=('/etc',))``):
    format chooses the addresses and creates the users, the node runs from
    cron (/etc/cron.d/slapos-node, :data:`CRON`). Returns the proxy's
    Popen."""
    if not lab.shared.get(NODE):
        raise LabError('deploy_node: the lab must share %s (Lab(...,'
                       ' shared={NODE: node_install()}))' % NODE)
    proxy = _prepare(lab, node, master, partitions, others,
                     NODE + '/bin/slapos', usual)
    a = lab[node]
    if usual:
        a.run(['sh', '-c', 'cat > /etc/cron.d/slapos-node'], input=CRON)
    else:
        # slapgrid refuses to run buildout as root: the software user and
        # the partitions' user is nobody in the lab (the hosts share
        # /etc/passwd).
        a.run(['chown', '65534:65534', '/opt/slapgrid'])
        for n in range(partitions):
            a.run(['chown', '65534:65534', '/srv/slapgrid/slappart%d' % n])
    slapgrid(lab[master], 'supply', software, COMPUTER)
    request(lab, master, title, software, software_type, parameters)
    slapgrid(a, 'node', 'software', '--all')
    # The first run builds the partition; slapgrid returns before its
    # programs are up on a fresh supervisord, hence the wait of the callers.
    slapgrid(a, 'node', 'instance')
    return proxy


# The node's cron file, as the SlapOS package installs it (slapos.package's
# slapos-node.cron.d), with the lab's slapos.cfg.
CRON = '''SHELL=/bin/sh
PATH=/usr/bin:/usr/sbin:/sbin:/bin
MAILTO=""

# Run "Installation/Destruction of Software Releases" and "Deploy/Start/Stop Partitions" once per minute
* * * * * root %(slapos)s node software --cfg %(cfg)s > /dev/null 2>&1
* * * * * root %(slapos)s node instance --cfg %(cfg)s > /dev/null 2>&1

# Run "Destroy Partitions to be destroyed" once per hour
0 * * * * root %(slapos)s node report --maximal_delay=3600 --cfg %(cfg)s > /dev/null 2>&1

# Run "Check/add IPs and so on" once per hour
0 * * * * root %(slapos)s node format --cfg %(cfg)s >> /var/log/slapos-node-format.log 2>&1
''' % {'slapos': NODE + '/bin/slapos', 'cfg': '/etc/opt/slapos/slapos.cfg'}


COMPUTER_ADDRESS = """
import sqlite3, sys
db = sqlite3.connect('/var/lib/slaposha/proxy.db')
# computer<schema version> (17 in slapos.core 1.24.1)
table, = [name for name, in db.execute("SELECT name FROM sqlite_master"
          " WHERE type = 'table' AND name GLOB 'computer[0-9]*'")]
print(db.execute('SELECT address FROM %s WHERE reference = ?' % table,
                 (sys.argv[1],)).fetchone()[0])
"""


def computer_address_on_master(lab, master='hM'):
    """The computer's address as the slapproxy of ``master`` recorded it
    (the last `slapos node format` posted it)."""
    return lab[master].run(['python3', '-c', COMPUTER_ADDRESS, COMPUTER]
                           ).stdout.strip()


REQUEST = """
import json, sys
from slapos import slap
master, software, title, software_type, parameters, state = json.loads(
    sys.argv[1])
connection = slap.slap()
connection.initializeConnection(master)
partition = connection.registerOpenOrder().request(
    software, title, partition_parameter_kw=parameters,
    software_type=software_type, state=state)
print(json.dumps(partition.getConnectionParameterDict()))
"""


def request(lab, master, title, software=SR_URL, software_type=None,
            parameters=None, state=None):
    """Request instance ``title`` of ``software`` from the slapproxy of
    ``master`` as `slapos request` does (the slap library of the node
    install): ``software_type`` (None: default), ``parameters`` (a dict
    of strings) and ``state`` (None: started; stopped, destroyed). Returns
    the instance's connection parameters, empty until its partition
    published them; requesting again with the same parameters changes
    nothing and reads them again."""
    m = lab[master]
    p = m.run([NODE + '/bin/python', '-c', REQUEST, json.dumps([
        'http://%s:18080' % m.address, software, title, software_type,
        parameters or {}, state])], env={'PATH': '/usr/bin:/bin',
                                         'HOME': '/root'})
    return json.loads(p.stdout)


def slaposha_release():
    """Build the slaposha software release of this checkout into the node
    install (:func:`node_install` first), where every lab host reads it at
    SLAPOSHA_URL: a wheel of the checkout (wheels/), software/slaposha
    (profile/) and a software.cfg that extends it and takes the slaposha
    egg from the wheels only (slaposha.lab.release); software.cfg.json and
    the schemas beside it, where slapos request looks for them. Readable by
    the partitions' user. Returns SLAPOSHA_URL."""
    from slaposha.lab.release import SOFTWARE, build_wheel, local_release
    folder = os.path.join(NODE_SOURCE, 'sr', 'slaposha')
    inside = os.path.dirname(SLAPOSHA_URL)
    with open(NODE_SOURCE + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(folder, True)
        profile = os.path.dirname(SOFTWARE)
        shutil.copytree(profile, os.path.join(folder, 'profile'))
        for name in os.listdir(profile):
            if name.endswith('.json'):
                shutil.copy2(os.path.join(profile, name), folder)
        build_wheel(os.path.join(folder, 'wheels'))
        local_release(folder, find_links=inside + '/wheels',
                      software=inside + '/profile/software.cfg')
        subprocess.run(['chmod', '-R', 'go+rX', folder], check=True)
    return SLAPOSHA_URL


def post_record(lab, record, via='hO', timeout=2, address=None):
    """Store ``record`` in recordstore's partition (the answer, "ok N", or
    None when it does not answer); ``address``: the partition's, when
    format chose it (:func:`node_address`)."""
    return get(lab, via, 'http://%s:%d/records' % (
        address or partition_address(0), PORT), timeout, data=record)


BUILDOUT_FACTS = """
import hashlib, json, os, sys
found = {}
for name in sys.argv[1:]:
    path = os.path.join('/srv/slapgrid/slappart0', name)
    with open(path, 'rb') as f:
        found[name] = [hashlib.sha256(f.read()).hexdigest(),
                       os.stat(path).st_mtime]
print(json.dumps(found))
"""


def buildout_facts(lab, host, names=('.installed.cfg', '.timestamp',
                                     'buildout.cfg',
                                     'etc/service/recordsrv')):
    """What a buildout run in partition 0 would change: these files'
    content and mtime (read in the host: its /srv is its own disk)."""
    return json.loads(lab[host].run(['python3', '-c', BUILDOUT_FACTS] +
                                    list(names)).stdout)


def node_address(lab, host, n=0):
    """Partition ``n``'s IPv4 address, as format chose it on ``host``."""
    text = lab[host].run(['cat', '/srv/slapgrid/slappart%d/.slapos-resource'
                          % n]).stdout
    return [a['addr'] for a in json.loads(text)['address_list']
            if ':' not in a['addr']][0]


POSTER = """
import json, sys, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
acked = []
for record in json.loads(sys.stdin.read()):
    try:
        answer = urllib.request.urlopen(url, data=record.encode(),
                                        timeout=timeout).read().decode()
    except Exception:
        continue
    if answer.startswith('ok '):
        acked.append(record)
print(json.dumps(acked))
"""


def post_records(lab, items, via='hO', timeout=2, address=None):
    """Store every record of ``items`` in one client process in ``via``;
    returns those the partition acknowledged (stored and fsynced)."""
    url = 'http://%s:%d/records' % (address or partition_address(0), PORT)
    p = lab[via].run(['python3', '-c', POSTER, url, str(timeout)],
                     input=json.dumps(list(items)), timeout=600)
    return json.loads(p.stdout)


def records(lab, via='hO', timeout=2, address=None):
    """The records the partition serves (a list, maybe empty), or None
    when it does not answer."""
    text = get(lab, via, 'http://%s:%d/records' % (
        address or partition_address(0), PORT), timeout)
    if text is None or not text.startswith('records '):
        return None
    return text.splitlines()[1:]


# -- instance_root on btrfs ----------------------------------------------------

# The hosts' own paths when /srv is each host's btrfs disk and instance_root
# (/srv/slapgrid) a subvolume on it, replicated by the ``btrfs`` driver.
# The disk is mounted in the host only: read its files from inside.
BTRFS_PATHS = tuple(p for p in HOST_PATHS if p != '/srv/slapgrid')


def btrfs_srv(lab, hosts, size='512M', first='hA'):
    """Give each of ``hosts`` (of a lab made with ``paths=BTRFS_PATHS``) a
    btrfs disk at /srv, mounted again after a restart (as from its fstab),
    as an operator would prepare the peers; make /srv/slapgrid a subvolume
    on ``first`` (None: leave it to the node, a folder)."""
    for name in hosts:
        device = lab.add_disk(name, size, label='srv')
        subprocess.run(['mkfs.btrfs', '-q', '-f', device], check=True,
                       stdout=subprocess.DEVNULL)
        lab.mount_disk(name, device, '/srv')
    if first:
        lab[first].run(['btrfs', 'subvolume', 'create', '/srv/slapgrid'])
