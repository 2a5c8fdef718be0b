"""A slaposha cluster in the lab: config files, agents, and an observer.

Used by the coordination tests, the demo and the benchmarks::

    with Lab(['hA', 'hB', 'hW']) as lab:
        lc = LabCluster(lab, hosts=['hA', 'hB'], witnesses=['hW'],
                        services={'web': '[app#main]\\ncommand = sleep 1d\\n'})
        lc.start()
        owner = lc.wait_owner('web')

The agents run as real processes in their hosts (``slaposha agent``), each
with its embedded etcd member. The root namespace has no address in the
lab, so what the tests read from etcd they read from inside a host.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

from slaposha.lab import LabError, wait_for

__all__ = ['LabCluster', 'Observer', 'make_test_pki', 'holds_address',
           'marked_pids', 'lab_etcd', 'spread_services', 'LAB_ETCD',
           'SYSTEM_ETCD']

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# The etcd of the lab, the demo and the benchmarks: Debian 13's 3.5, with
# the lease-safety fixes, fetched by tools/setup.sh into the checkout.
LAB_ETCD = os.path.join(TOP, '.lab', 'etcd', 'usr', 'bin', 'etcd')
# Debian 12's own (3.4.23, without them): one test keeps it working.
SYSTEM_ETCD = '/usr/bin/etcd'


def lab_etcd():
    """The lab's etcd executable; LabError if tools/setup.sh has not
    fetched it."""
    if not os.access(LAB_ETCD, os.X_OK):
        raise LabError('%s is missing: run tools/setup.sh (it fetches etcd'
                       ' 3.5 for the lab)' % LAB_ETCD)
    return LAB_ETCD


def spread_services(hosts, count, first_marker):
    """``count`` services ``s00``, ``s01``... of one program each (``sleep``
    with its own marker, ``first_marker`` + its number), spread over
    ``hosts``: each host the preferred one of as many, and the services of
    one host falling back to different hosts, as an operator would place
    them. Returns {name: service file}."""
    services = {}
    for i in range(count):
        first = hosts[i % len(hosts)]
        rest = [h for h in hosts if h != first]
        turn = (i // len(hosts)) % max(1, len(rest))
        order = [first] + rest[turn:] + rest[:turn]
        services['s%02d' % i] = textwrap.dedent('''
            [service]
            hosts = %s
            [app#main]
            command = exec sleep %d
        ''') % (' '.join(order), first_marker + i)
    return services


class LabCluster(object):

    def __init__(self, lab, hosts, witnesses=(), services=None, name=None,
                 settings='', tls=False, external_etcd=None, config_dir=None,
                 etcd_binary=None):
        self.lab = lab
        self.hosts = list(hosts)
        self.witnesses = list(witnesses)
        self.services = services or {}
        self.name = name or 'lab%s' % lab.id
        self.settings = settings
        self.tls = tls
        # A host that runs a plain etcd started by the lab, which the
        # cluster uses as an external one ([etcd] mode = external).
        self.external_etcd = external_etcd
        # Every member runs it ([etcd] binary), the external one too.
        self.etcd_binary = etcd_binary or lab_etcd()
        # Several clusters in one lab each have their own folder.
        self.config_dir = config_dir or os.path.join(lab.workdir, 'config')
        self.cluster_file = os.path.join(self.config_dir, 'cluster.cfg')
        self.agents = {}
        self.write_config()

    # -- configuration ---------------------------------------------------------

    def write_config(self):
        os.makedirs(os.path.join(self.config_dir, 'services'), exist_ok=True)
        lines = ['[cluster]', 'name = %s' % self.name,
                 'hosts = %s' % ' '.join(self.hosts)]
        if self.witnesses:
            lines.append('witnesses = %s' % ' '.join(self.witnesses))
        if self.tls:
            lines.append('tls = true')
            make_test_pki(os.path.join(self.config_dir, 'ssl'), {
                name: self.lab[name].address
                for name in self.hosts + self.witnesses})
        for name in self.hosts + self.witnesses:
            lines += ['[host %s]' % name,
                      'address = %s' % self.lab[name].address]
        lines += ['[etcd]', 'binary = %s' % self.etcd_binary,
                  'heartbeat_interval = 50ms', 'election_timeout = 500ms']
        if self.external_etcd:
            lines += ['mode = external', 'endpoints = http://%s:2379'
                      % self.lab[self.external_etcd].address]
        text = '\n'.join(lines) + '\n' + textwrap.dedent(self.settings)
        with open(self.cluster_file, 'w') as f:
            f.write(text)
        for name, body in self.services.items():
            with open(os.path.join(self.config_dir, 'services',
                                   name + '.cfg'), 'w') as f:
                f.write(textwrap.dedent(body))

    # -- agents -----------------------------------------------------------------

    def command(self, *args):
        return [sys.executable, '-m', 'slaposha.cli.main', '-c',
                self.cluster_file] + list(args)

    def env(self):
        env = dict(os.environ)
        env['PYTHONPATH'] = TOP + os.pathsep + env.get('PYTHONPATH', '')
        env['PYTHONUNBUFFERED'] = '1'
        return env

    def start_agent(self, host):
        proc = self.lab[host].spawn(self.command('agent', '--host', host),
                                    name='agent', env=self.env())
        self.agents[host] = proc
        return proc

    def start_witness(self, host):
        proc = self.lab[host].spawn(self.command('witness', '--host', host),
                                    name='witness', env=self.env())
        self.agents[host] = proc
        return proc

    def start(self):
        if self.external_etcd:
            host = self.lab[self.external_etcd]
            url = 'http://%s:2379' % host.address
            host.spawn([self.etcd_binary, '--name', 'external', '--data-dir',
                        host.path('/var/lib/slaposha') + '/external-etcd',
                        '--listen-client-urls', url,
                        '--advertise-client-urls', url,
                        '--listen-peer-urls', 'http://127.0.0.1:2380',
                        '--initial-advertise-peer-urls',
                        'http://127.0.0.1:2380',
                        '--initial-cluster', 'external=http://127.0.0.1:2380',
                        '--heartbeat-interval', '50',
                        '--election-timeout', '500'], name='etcd')
        for host in self.witnesses:
            self.start_witness(host)
        for host in self.hosts:
            self.start_agent(host)
        for host in self.hosts:
            self.wait_agent(host)
        return self

    def wait_agent(self, host, timeout=30):
        """Wait until the agent of ``host`` answers on its socket."""
        sock = self.lab[host].path('/run/slaposha/agent.sock')

        def ready():
            if self.agents[host].poll() is not None:
                raise LabError('agent of %s exited: %s' % (
                    host, self.log(host)[-1000:]))
            # Answering, not just there: a file may be left from before.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(sock)
                return True
            except OSError:
                return False
            finally:
                probe.close()
        wait_for(ready, timeout, what='agent of %s answering' % host)

    def cli(self, host, *args, check=True, timeout=120):
        """Run ``slaposha <args>`` in ``host``; returns CompletedProcess."""
        return self.lab[host].run(self.command(*args), env=self.env(),
                                  check=check, timeout=timeout)

    def agent_pid(self, host):
        return self.agents[host].pid

    def wait_standby(self, host, rid, timeout=60):
        """Wait until ``host`` is an eligible standby whose copy of the data
        resource ``rid`` the owner reports (its status line names it);
        returns the status tree."""
        def ready():
            out = self.cli(host, 'status', check=False).stdout
            line = out.split(rid)[-1].split('\n')[0] if rid in out else ''
            return 'not eligible' not in out and host + ':' in line and \
                'no copy' not in line and out
        return wait_for(ready, timeout, interval=0.5,
                        what='%s an eligible standby with a copy' % host)

    def stop_agent(self, host, timeout=20):
        proc = self.agents.get(host)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self, host, name='agent'):
        path = os.path.join(self.lab[host].root, 'log', name + '.log')
        try:
            with open(path, errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def etcd_pid(self, host):
        try:
            with open(self.lab[host].path('/run/slaposha/etcd.pid')) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    # -- reading etcd from inside a host -------------------------------------

    def query(self, host, code, timeout=20):
        """Run Python ``code`` in ``host`` with ``client`` (an etcd Client on
        every member) and ``keys`` bound; it sets ``result``, which comes
        back decoded from JSON."""
        script = textwrap.dedent('''
            import json, sys
            from slaposha.config import load_cluster
            from slaposha.cluster.etcd import Client
            from slaposha.cluster.keys import Keys
            cluster = load_cluster(%r)
            client = Client(cluster.etcd_endpoints(), timeout=5,
                            tls=cluster.tls_files(%r))
            keys = Keys(cluster.etcd.prefix, cluster.name)
            result = None
        ''' % (self.cluster_file, host)) + textwrap.dedent(code) + \
            '\nprint(json.dumps(result))\n'
        p = self.lab[host].run([sys.executable, '-c', script],
                               env=self.env(), timeout=timeout)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def owner(self, service, via):
        """(host, token) of the service's owner key, or (None, None)."""
        return tuple(self.query(via, '''
            kv = client.get(keys.owner(%r))
            result = [kv.value, kv.create_revision] if kv else [None, None]
        ''' % service))

    def wait_owner(self, service, via, timeout=30, not_host=None):
        def check():
            host, token = self.owner(service, via)
            if host is not None and host != not_host:
                return host, token
            return None
        return wait_for(check, timeout, interval=0.2,
                        what='an owner of %s' % service)

    def etcd_leader(self, via):
        """The name of the host whose member leads etcd."""
        return self.query(via, '''
            statuses = {}
            for url in client.endpoints:
                try:
                    statuses[url] = client.status(url)
                except Exception:
                    pass
            members = {m.id: m.name for m in client.members()}
            leader = [s.leader for s in statuses.values()][0]
            result = members.get(leader)
        ''')


    def move_leader(self, to, via):
        """Hand etcd's raft leadership to the member of host ``to``."""
        self.query(via, '''
            ids = {m.name: m.id for m in client.members()}
            for url in client.endpoints:
                try:
                    if client.status(url).is_leader:
                        client.move_leader(ids[%r], url)
                        break
                except Exception:
                    pass
        ''' % to)
        return wait_for(lambda: self.etcd_leader(via) == to, 10,
                        interval=0.2, what='etcd leader on %s' % to)


class Observer(object):
    """Watches, from outside every host, where something runs.

    Polls each host every ``interval`` seconds with ``probe(host)`` (by
    default: a process whose command line contains ``marker``), and keeps
    the moments each host was first and last seen with it, and whether two
    hosts ever had it at once.

    The hosts are looked at one after the other: seeing it on hA, then on
    hB a moment later, does not prove both ran it at one instant (hA's may
    have ended in between, and hB started after). An overlap is counted
    when the hosts seen before the last one still have it after it was
    seen there (with the default probe, the same processes: they ran
    during the whole look, so at the moment the last host was seen).
    """

    def __init__(self, lab, marker=None, interval=0.02, probe=None,
                 hosts=None):
        self.lab = lab
        self.marker = marker.encode() if marker else None
        self.probe = probe or self.running_on
        self.hosts = hosts
        self.interval = interval
        self.first = {}
        self.last = {}
        self.overlaps = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def running_on(self, host):
        return bool(marked_pids(host, self.marker))

    def _look(self, host):
        """What the probe finds on ``host``: its processes with the
        default probe, else whether the probe says yes."""
        if self.probe == self.running_on:
            return set(marked_pids(host, self.marker))
        return bool(self.probe(host))

    def _watched(self):
        return [h for h in self.lab if self.hosts is None or
                h.name in self.hosts]

    def _run(self):
        while not self._stop.is_set():
            now = time.monotonic()
            seen = [(h, found) for h, found in
                    ((h, self._look(h)) for h in self._watched()) if found]
            for host, _ in seen:
                self.first.setdefault(host.name, now)
                self.last[host.name] = now
            if len(seen) > 1:
                # Still there after the last one was seen: both at once.
                still = [host.name for host, found in seen[:-1]
                         if self._still(host, found)]
                if still:
                    self.overlaps.append((now, still + [seen[-1][0].name]))
            self.samples += 1
            self._stop.wait(self.interval)

    def _still(self, host, found):
        again = self._look(host)
        if isinstance(found, set):
            return bool(found & again)
        return again

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def where(self):
        return [h.name for h in self._watched() if self.probe(h)]

    def wait_running(self, host, timeout):
        """Wait until the observer has seen the service on ``host``."""
        return wait_for(lambda: host in self.first, timeout, interval=0.02,
                        what='service running on %s' % host)


def marked_pids(host, marker):
    """PIDs of the host's processes whose command line contains
    ``marker`` (str or bytes)."""
    if isinstance(marker, str):
        marker = marker.encode()
    found = []
    for pid in host.pids():
        try:
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                if marker in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def check_no_overlap(observer):
    if observer.overlaps:
        t, where = observer.overlaps[0]
        raise LabError('service ran on %s at once (%d samples)'
                       % (' and '.join(where), len(observer.overlaps)))


def make_test_pki(folder, hosts):
    """A CA and a certificate per host (``{name: address}``), as ``ca.crt``,
    ``<name>.crt`` and ``<name>.key``, made with the cluster's own PKI
    (slaposha.pki), host role included; the CA key stays in the folder."""
    from slaposha import pki
    os.makedirs(folder, mode=0o700, exist_ok=True)
    ca_key, ca_cert = pki.create_ca('lab', days=30)
    pki.write_key(os.path.join(folder, 'ca.key'), ca_key, overwrite=True)
    pki.write_cert(os.path.join(folder, 'ca.crt'), ca_cert)
    for name, address in hosts.items():
        key = pki.new_key()
        cert = pki.issue(ca_key, ca_cert, key.public_key(), name,
                         pki.HOST_ROLE, address=address, days=30)
        pki.write_key(os.path.join(folder, name + '.key'), key,
                      overwrite=True)
        pki.write_cert(os.path.join(folder, name + '.crt'), cert)


def holds_address(address):
    """A probe for Observer: the host has ``address`` on an interface (read
    from outside, with ``ip -n``)."""
    def probe(host):
        # A crashed host (link down) holds nothing anyone can reach.
        with open('/sys/class/net/%s/operstate' % host.veth) as f:
            if f.read().strip() != 'up':
                return False
        out = subprocess.run(['ip', '-n', host.netns, '-o', 'addr', 'show'],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True).stdout
        return (' %s/' % address) in out
    return probe
