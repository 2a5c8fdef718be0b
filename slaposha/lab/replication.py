"""btrfs replication in the multi-host lab, for the tests and benchmarks.

Each host gets its own btrfs file system on a loop device, mounted in the
host at /srv/slapgrid-fs (``FS``); the protected volume is the subvolume
/srv/slapgrid-fs/slapgrid (``VOL``). Receivers, owners (the ``btrfs``
driver, ticked as the agent will) and writers run as processes inside the
hosts, with certificates of a throw-away CA, so that crashing a host kills
them as a power cut would::

    with Lab(['hA', 'hB'], paths=LAB_PATHS) as lab:
        rl = ReplicationLab(lab)
        rl.receiver('hB')
        owner, report = rl.owner('hA', token=10, interval=0.5)
"""

import json
import os
import subprocess
import sys
import textwrap
import time

from slaposha.lab import HOST_PATHS, LabError, wait_for
from slaposha.lab.cluster import TOP, make_test_pki, marked_pids

__all__ = ['ReplicationLab', 'LAB_PATHS', 'FS', 'VOL', 'SNAPDIR', 'PORT',
           'OWNER', 'APPENDER', 'read_report', 'remove_mount_point',
           'record_writer', 'ask_switch', 'stall_receive',
           'crash_during_handover']

FS = '/srv/slapgrid-fs'
VOL = FS + '/slapgrid'
SNAPDIR = FS + '/.slaposha/snapshots/slapgrid'
PORT = 1216
LAB_PATHS = HOST_PATHS + (FS,)

# The owner: the btrfs driver, configured as the agent will; one JSON line
# in its report per snapshot sent to a standby (or not: its error), with
# when the snapshot was taken; SIGTERM stops it (the driver then sends a
# last snapshot).
OWNER = textwrap.dedent('''\
    import json, os, signal, sys, tempfile, threading, time
    from slaposha import config
    from slaposha.cgroup import Cgroup
    from slaposha.resources import driver
    from slaposha.service import Context
    req = json.loads(sys.argv[1])
    folder = tempfile.mkdtemp(prefix='slaposha-owner-')
    path = os.path.join(folder, 'svc.cfg')
    with open(path, 'w') as f:
        f.write('[btrfs#data]\\nvolume = %s\\ninterval = %s\\nkeep = 3\\n'
                % (req['volume'], req['interval']))
        if req.get('min_interval') is not None:
            f.write('min_interval = %s\\n' % req['min_interval'])
        for key, value in sorted((req.get('options') or {}).items()):
            f.write('%s = %s\\n' % (key, value))
    section, = config.load_service(path).resources
    res = driver('btrfs')(section, Context('svc', Cgroup(folder), folder))
    res.configure(req['token'], req['peers'], req['tls'], req['host'])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    out = open(req['report'], 'a')
    lock = threading.Lock()
    def say(**kw):
        with lock:
            out.write(json.dumps(kw) + '\\n')
            out.flush()
    def sent(cycle):
        if cycle.results or cycle.errors:  # not a snapshot just taken
            say(snapshot=cycle.snapshot and cycle.snapshot.name,
                created=cycle.started, done=time.time(),
                seconds=cycle.seconds,
                sent={k: t._asdict() for k, t in cycle.results.items()},
                errors={str(k): str(e) for k, e in cycle.errors.items()},
                status=list(res.status()))
    res.observers.append(sent)
    res.start()
    say(started=time.time())
    while not stopping:
        time.sleep(0.02)
    res.stop()
    say(stopped=True, status=list(res.status()))
''')

# Appends numbered records of SIZE bytes at RATE a second (as fast as it
# can when behind), each made durable (fsync) before it is acknowledged in
# a log outside the volume: DATA ACKS SIZE RATE.
APPENDER = textwrap.dedent('''\
    import os, sys, time
    data = open(sys.argv[1], 'ab')
    acks = open(sys.argv[2], 'a')
    size, rate = int(sys.argv[3]), float(sys.argv[4])
    start = time.monotonic()
    n = 0
    while True:
        n += 1
        data.write(b'%08d ' % n + b'r' * (size - 10) + b'\\n')
        data.flush()
        os.fsync(data.fileno())
        acks.write('%d %.6f\\n' % (n, time.time()))
        acks.flush()
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
''')


def record_writer(folder, every=0.02):
    """The program of a writer that appends numbered records to
    ``folder``/records, each made durable (fsync) before it is
    acknowledged, continuing the file it finds. Its output, to keep on the
    host's disk outside the data: ``found N TIME`` at its start, then
    ``ack N TIME`` per record (wall clock)."""
    return textwrap.dedent('''\
        import os, time
        path = %r + '/records'
        n = sum(1 for _ in open(path)) if os.path.exists(path) else 0
        print('found', n, '%%.6f' %% time.time(), flush=True)
        f = open(path, 'a')
        while True:
            n += 1
            f.write('%%d\\n' %% n)
            f.flush()
            os.fsync(f.fileno())
            print('ack', n, '%%.6f' %% time.time(), flush=True)
            time.sleep(%r)
    ''') % (folder, every)


def ask_switch(lc, service, source, target):
    """``slaposha switch SERVICE --to TARGET --no-wait`` on ``source``,
    again while refused: the target's published eligibility may follow its
    own status by a moment."""
    refused = []

    def asked():
        p = lc.cli(source, 'switch', service, '--to', target, '--no-wait',
                   check=False)
        if p.returncode == 0:
            return True
        if 'may not run' in p.stderr:
            refused[:] = [p.stderr.strip()]
            return None
        raise LabError('switch to %s: %s' % (target, p.stderr.strip()))
    try:
        wait_for(asked, 20, interval=0.5,
                 what='the switch to %s accepted' % target)
    except LabError as e:
        raise LabError('%s; refused: %s' % (e, refused[0]))


def stall_receive(lab, host, receive):
    """Stop with SIGSTOP a receive on ``host`` (a process whose command line
    holds ``receive``) as soon as one runs: a disk that no longer writes;
    the transfer to it stalls. Returns its PIDs (``lab.resume``)."""
    def stalled():
        pids = marked_pids(lab[host], receive)
        lab.pause(host, pids)
        return pids
    return wait_for(stalled, 30, interval=0.01,
                    what='a receive on %s' % host)


def crash_during_handover(lc, service, source, target, writer, receive):
    """A switch of ``service`` from ``source`` to ``target`` whose target
    crashes while the source hands it the data: a receive on the target
    (a process whose command line holds ``receive``, e.g.
    ``b'btrfs\\x00receive'``) is stopped with SIGSTOP as soon as one runs
    (a disk that no longer writes), so that a transfer to it is on its way;
    (:func:`stall_receive`); the switch is asked; once the application (``writer``, a marker of its
    command line, a :func:`record_writer`) stopped on the source, the
    target crashes. Returns (the last record the writer acknowledged
    there, seconds from the crash until the service runs on the source
    again: its owner, the writer running)."""
    lab = lc.lab
    stall_receive(lab, target, receive)
    ask_switch(lc, service, source, target)
    wait_for(lambda: not marked_pids(lab[source], writer), 20,
             interval=0.05, what='the writer stopped on %s' % source)
    with open(lab[source].path('/var/lib/slaposha/log') + '/%s.app.writer'
              '.log' % service, errors='replace') as f:
        acked = [int(line.split()[1]) for line in f
                 if line.startswith('ack ')][-1]
    time.sleep(0.5)
    assert 'hand-over to %s' % target not in lc.log(source), \
        'the hand-over ended before the crash'
    lab.crash(target)
    crashed = time.monotonic()
    wait_for(lambda: lc.owner(service, source)[0] == source and
             marked_pids(lab[source], writer), 90, interval=0.1,
             what='%s back on %s' % (service, source))
    back = time.monotonic() - crashed
    print('%s back on %s %.2f s after %s crashed during the hand-over' % (
        service, source, back, target))
    return acked, back


def remove_mount_point():
    """Remove the empty FS folder a lab made in the root file system: a lab
    removes the folders it made only when no other lab runs, and other
    labs do not know this one. A folder still in use is left."""
    try:
        os.rmdir(FS)
    except OSError:
        pass


def read_report(path):
    """The JSON lines an OWNER wrote so far."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith('\n')]
    except OSError:
        return []


class ReplicationLab(object):
    """The hosts of a started Lab (made with ``paths=LAB_PATHS``), each with
    a btrfs disk of ``disk_size`` mounted at FS; the volume VOL is created
    on ``first``."""

    def __init__(self, lab, disk_size='512M', first='hA'):
        self.lab = lab
        self.ssl_dir = os.path.join(lab.workdir, 'ssl')
        make_test_pki(self.ssl_dir, {h.name: h.address for h in lab})
        self.disks = {}
        self.receivers = {}
        for host in lab:
            device = lab.add_disk(host.name, disk_size)
            subprocess.run(['mkfs.btrfs', '-q', '-f', device], check=True,
                           stdout=subprocess.DEVNULL)
            self.disks[host.name] = device
            self.mount(host.name)
        lab[first].run(['btrfs', 'subvolume', 'create', VOL])

    def __getitem__(self, name):
        return self.lab[name]

    def mount(self, name):
        """Mount the host's disk (again, after a lab restart)."""
        self.lab[name].run(['mount', '-o', 'noatime', self.disks[name], FS])

    def env(self):
        return dict(os.environ, PYTHONPATH=TOP, PYTHONUNBUFFERED='1')

    def tls(self, name):
        return [os.path.join(self.ssl_dir, f) for f in
                ('ca.crt', name + '.crt', name + '.key')]

    def other(self, name):
        others = [h.name for h in self.lab if h.name != name]
        return others[0]

    def log(self, name, what='receiver'):
        try:
            with open(os.path.join(self.lab[name].root, 'log',
                                   what + '.log'), errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    # -- processes in the hosts -----------------------------------------------

    def receiver(self, name, idle_timeout=10, retention=None):
        """Start the receiver of host ``name`` and wait until it listens;
        ``retention``: "hourly,daily,weekly" snapshots it keeps as backups."""
        host = self.lab[name]
        extra = ['--retention', retention] if retention else []
        proc = host.spawn([sys.executable, '-m', 'slaposha.replication',
                           'receiver', '--host', name, '--listen',
                           host.address, '--port', str(PORT), '--ssl-dir',
                           self.ssl_dir, '--idle-timeout', str(idle_timeout)]
                          + extra + [VOL], name='receiver', env=self.env())
        self.receivers[name] = proc

        def listening():
            if proc.poll() is not None:
                raise LabError('receiver of %s exited: %s' % (
                    name, self.log(name)[-500:]))
            return 'listening on' in self.log(name)
        wait_for(listening, 10, what='receiver of %s' % name)
        return proc

    def stop_receivers(self):
        """Stop the receivers this object started, by PID."""
        for proc in self.receivers.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def report_path(self, name, token):
        return self.lab[name].path('/var/lib/slaposha/owner-%d.jsonl' % token)

    def owner(self, name, token, interval=0.5, peers=None,
              min_interval=None, options=None):
        """The btrfs driver as the owner on ``name``, sending to ``peers``
        (default: every other host), with more keys of its section in
        ``options``; returns (process, report path in the root
        namespace)."""
        host = self.lab[name]
        peers = peers or [h.name for h in self.lab if h.name != name]
        inside = '/var/lib/slaposha/owner-%d.jsonl' % token
        request = {'volume': VOL, 'interval': interval, 'token': token,
                   'min_interval': min_interval, 'options': options,
                   'peers': {p: [self.lab[p].address, PORT] for p in peers},
                   'tls': self.tls(name), 'host': name, 'report': inside}
        proc = host.spawn([sys.executable, '-c', OWNER, json.dumps(request)],
                          name='owner-%d' % token, env=self.env())
        return proc, self.report_path(name, token)

    def appender(self, name, size, rate, data=VOL + '/records',
                 acks='/var/lib/slaposha/acks.log'):
        """Start an APPENDER in ``name``; returns (process, acks path in
        the root namespace)."""
        proc = self.lab[name].spawn([sys.executable, '-c', APPENDER, data,
                                     acks, str(size), str(rate)],
                                    name='appender', env=self.env())
        return proc, self.lab[name].path(acks)

    def cycle(self, name, token, peer=None, check=True):
        """One snapshot of ``name``'s volume sent to ``peer`` (default: the
        other host), by the command line; its JSON (or its error line)."""
        peer = self.lab[peer or self.other(name)]
        p = self.lab[name].run([sys.executable, '-m', 'slaposha.replication',
                                'cycle', VOL, '--host', name, '--token',
                                str(token), '--ssl-dir', self.ssl_dir,
                                '--peer', '%s=%s:%d' % (peer.name,
                                                        peer.address, PORT)],
                               env=self.env(), check=check)
        return json.loads(p.stdout) if p.stdout.strip() else p.stderr

    def py(self, name, code, timeout=120):
        """Run Python ``code`` in host ``name``; it sets ``result``, which
        comes back decoded from JSON."""
        script = 'import json\nresult = None\n' + textwrap.dedent(code) + \
            '\nprint(json.dumps(result))\n'
        p = self.lab[name].run([sys.executable, '-c', script],
                               env=self.env(), timeout=timeout)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def status(self, name):
        return self.py(name, '''
            from slaposha.replication.volume import Volume
            result = Volume(%r).status()
        ''' % VOL)

    def promote(self, name):
        p = self.lab[name].run([sys.executable, '-m', 'slaposha.replication',
                                'promote', VOL], env=self.env())
        return p.stdout.strip()

    def sha(self, name, path):
        return self.lab[name].run(['sha256sum', path]).stdout.split()[0]
