"""The embedded etcd member: one per host (and witness), run by its agent.

DESIGN.md 1: by default there is nothing else to operate; each agent starts
an etcd member on its host's address, supervises it, and restarts it when it
dies. A two-host cluster adds a witness that runs only a member
(``slaposha witness``). With ``[etcd] mode = external`` no member runs.

etcd 3.5.13 and newer carry the lease-safety fixes (a stale leader could
renew or revoke leases: reference/coordination.md A.1); an older binary runs
with one warning.
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time

from slaposha.cluster.etcd import parse_version

__all__ = ['EtcdMember', 'MemberError', 'find_etcd', 'etcd_version',
           'SAFE_VERSION']

logger = logging.getLogger(__name__)

SAFE_VERSION = (3, 5, 13)

# A member that ran this many seconds is restarted again after 1 s when it
# dies; quicker deaths double the wait, up to 10 s.
STABLE = 30.0


class MemberError(Exception):
    """The member cannot be run, as one line."""


def find_etcd(configured=None):
    """The etcd executable: the configured one, else etcd in PATH (also
    /usr/sbin and /sbin, where root's PATH may lack them)."""
    if configured:
        if not os.access(configured, os.X_OK):
            raise MemberError('[etcd] binary %s is not an executable file'
                              % configured)
        return configured
    path = os.environ.get('PATH', '') + ':/usr/bin:/usr/sbin:/sbin'
    found = shutil.which('etcd', path=path)
    if found is None:
        raise MemberError('no etcd executable in PATH: install etcd-server or'
                          ' set [etcd] binary')
    return found


def etcd_version(binary):
    """(major, minor, patch) of an etcd executable."""
    try:
        out = subprocess.run([binary, '--version'], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=10,
                             universal_newlines=True).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MemberError('cannot run %s --version: %s' % (binary, e))
    m = re.search(r'etcd Version:\s*(\S+)', out)
    if not m:
        raise MemberError('%s --version did not say its version' % binary)
    return parse_version(m.group(1))


def _url(address, port, tls):
    host = '[%s]' % address if ':' in address else address
    return '%s://%s:%d' % ('https' if tls else 'http', host, port)


class EtcdMember(object):
    """One etcd member of the cluster, on ``host``, supervised.

    ``tls``: None, or (ca_file, cert_file, key_file) used for both the
    clients and the peers, each side requiring a certificate of the CA.
    """

    def __init__(self, cluster, host, tls=None, log_path=None):
        self.cluster = cluster
        self.host = host
        self.tls = tls
        etcd = cluster.etcd
        self.binary = find_etcd(etcd.binary)
        self.data_dir = os.path.join(cluster.cluster.state_dir, 'etcd')
        self.pid_file = os.path.join(cluster.cluster.run_dir, 'etcd.pid')
        self.log_path = log_path or os.path.join(
            cluster.cluster.state_dir, 'etcd.log')
        self.proc = None
        self.pid = None
        self.restarts = 0
        self.version = None
        self._stop = threading.Event()
        self._thread = None

    @property
    def address(self):
        return self.cluster.hosts[self.host].address

    @property
    def client_url(self):
        return _url(self.address, self.cluster.etcd.client_port, self.tls)

    def command(self):
        etcd = self.cluster.etcd
        tls = self.tls is not None
        peers = ','.join(
            '%s=%s' % (name, _url(self.cluster.hosts[name].address,
                                  etcd.peer_port, tls))
            for name in self.cluster.members)
        peer_url = _url(self.address, etcd.peer_port, tls)
        argv = [
            self.binary, '--name', self.host,
            '--data-dir', self.data_dir,
            '--listen-client-urls', self.client_url,
            '--advertise-client-urls', self.client_url,
            '--listen-peer-urls', peer_url,
            '--initial-advertise-peer-urls', peer_url,
            '--initial-cluster', peers,
            '--initial-cluster-state', 'new',
            '--initial-cluster-token', 'slaposha-' + self.cluster.name,
            '--heartbeat-interval',
            str(int(round(etcd.heartbeat_interval * 1000))),
            '--election-timeout',
            str(int(round(etcd.election_timeout * 1000))),
            '--logger', 'zap',
            # A member cut off from the others keeps raising its raft term;
            # without pre-vote it deposes the leader when it comes back
            # (etcd 3.4's default), and the elections that follow leave
            # every lease unrenewed long enough for the owners to fence
            # (found by the fault suite). etcd 3.5 has it on by default.
            '--pre-vote',
        ]
        if tls:
            ca, cert, key = self.tls
            argv += ['--trusted-ca-file', ca, '--cert-file', cert,
                     '--key-file', key, '--client-cert-auth',
                     '--peer-trusted-ca-file', ca, '--peer-cert-file', cert,
                     '--peer-key-file', key, '--peer-client-cert-auth']
        return argv

    def check_version(self):
        """Read the binary's version; warn once when it lacks the
        lease-safety fixes."""
        self.version = etcd_version(self.binary)
        if self.version < SAFE_VERSION:
            logger.warning(
                'etcd %s at %s lacks the lease-safety fixes of %s (a stale'
                ' etcd leader may renew or revoke leases): use etcd %s or'
                ' newer in production', '.'.join(map(str, self.version)),
                self.binary, '.'.join(map(str, SAFE_VERSION)),
                '.'.join(map(str, SAFE_VERSION)))
        return self.version

    def start(self):
        """Start the member (or adopt the one a previous agent left running)
        and supervise it in a thread."""
        self.check_version()
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(self.pid_file), exist_ok=True)
        adopted = self._adopt()
        if adopted:
            logger.info('etcd member %s: adopted running pid %d', self.host,
                        adopted)
        else:
            self._spawn()
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise,
                                        name='etcd-member', daemon=True)
        self._thread.start()
        return self

    def _adopt(self):
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().split()[0])
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                cmdline = f.read().split(b'\0')
        except (OSError, ValueError, IndexError):
            return None
        if self.data_dir.encode() in cmdline and \
                os.path.basename(cmdline[0]).startswith(b'etcd'):
            self.pid = pid
            return pid
        return None

    def _spawn(self):
        log = open(self.log_path, 'ab')
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise MemberError('cannot start %s: %s' % (self.binary, e))
        finally:
            log.close()
        self.pid = self.proc.pid
        with open(self.pid_file, 'w') as f:
            f.write('%d\n' % self.pid)
        logger.info('etcd member %s: started pid %d (%s)', self.host,
                    self.pid, self.client_url)

    def running(self):
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _supervise(self):
        delay = 1.0
        since = time.monotonic()
        while not self._stop.wait(0.5):
            if self.running():
                if time.monotonic() - since > STABLE:
                    delay = 1.0  # an old crash does not slow the next start
                continue
            code = self.proc.returncode if self.proc else None
            logger.warning('etcd member %s: exited (%s); restarting in %.0f s'
                           ' (log: %s)', self.host, code, delay,
                           self.log_path)
            if self._stop.wait(delay):
                return
            try:
                self._spawn()
                self.restarts += 1
                since = time.monotonic()
            except MemberError as e:
                logger.error('etcd member %s: %s', self.host, e)
            delay = min(delay * 2, 10.0)

    def stop(self, timeout=10.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self.pid is None or not self.running():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            if self.proc is not None:
                try:
                    self.proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()
        try:
            os.unlink(self.pid_file)
        except OSError:
            pass
