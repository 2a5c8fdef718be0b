"""What a flapping owner link costs (issue 15): the owner's link goes down
for 2 s and up for 2 s, for a minute.

Two hosts and a witness in the lab, real etcd members and agents, a
btrfs-replicated service whose program answers on a TCP port, the lease
timings of ``--profile``. Once the service runs and replicates, the
owner's link is cut ``--down`` seconds and back ``--up`` seconds, for
``--seconds`` (Lab.partition: its veth moved to a bridge of its own, a cut
at layer 2 that ends at once; setting the veth down and up would add the
kernel's carrier delay, up to 1 s, to every cut). A probe inside each
node host connects to the service's port every 0.1 s: the service is
available while it answers on some host. What the cut link stops (the
peers, clients across it) is not counted as downtime: what is counted is
the service being stopped, fenced or moved.

    .venv/bin/python benchmarks/flap.py [--profile default|fast]
        [--renew-interval S] [--seconds 60] [--down 2] [--up 2]

Prints owner changes (new fencing tokens), unavailability (share of probe
intervals in which no host answered), restarts of the service's process,
leases lost, and double-active (samples with the service's process on two
hosts at once). Goals: at most 1 owner change, under 10 % unavailability,
0 double-active.
"""

import argparse
import os
import platform
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, wait_for  # noqa: E402
from slaposha.lab.cluster import (  # noqa: E402
    LabCluster, Observer, marked_pids)
from slaposha.lab.replication import (  # noqa: E402
    LAB_PATHS, VOL, ReplicationLab)

PORT = 8097
PROBE_EVERY = 0.1

SERVER = '''
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', %d))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b'ok\\n')
    c.close()
''' % PORT

PROBE = '''
import socket, sys, time
while True:
    began = time.monotonic()
    try:
        c = socket.create_connection(('127.0.0.1', %d), timeout=0.08)
        ok = c.recv(3) == b'ok\\n'
        c.close()
    except OSError:
        ok = False
    print('%%.3f %%d' %% (began, ok), flush=True)
    time.sleep(max(0.0, %r - (time.monotonic() - began)))
''' % (PORT, PROBE_EVERY)

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = 0.5
    [app#server]
    command = exec python3 -u %s %s
'''


def answers(path, began, ended):
    """{probe interval index: answered} of a probe's log between two
    moments."""
    seen = {}
    with open(path) as f:
        for line in f:
            try:
                t, ok = line.split()
                t, ok = float(t), ok == '1'
            except ValueError:
                continue
            if began <= t < ended:
                i = int((t - began) / PROBE_EVERY)
                seen[i] = seen.get(i, False) or ok
    return seen


class Restarts(object):
    """Counts new sets of the service's PIDs on the host running it."""

    def __init__(self, lab, marker):
        self.lab, self.marker = lab, marker
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        last = None
        while not self._stop.wait(0.2):
            now = set()
            for host in ('hA', 'hB'):
                now.update(marked_pids(self.lab[host], self.marker))
            if now and last and not now & last:
                self.count += 1
            if now:
                last = now

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def flap(lab, lc, observer, args):
    owner, token = lc.wait_owner('web', 'hW', timeout=60)
    observer.wait_running(owner, 60)

    def replicated():
        out = lc.cli(owner, 'status', check=False).stdout
        return 'btrfs#data' in out and ' up ' in out.split('btrfs#data')[1]\
            .split('\n')[0]
    wait_for(replicated, 90, interval=0.5, what='the owner replicating')
    probes = {host: lab[host].spawn(['python3', '-u', '-c', PROBE],
                                    name='probe') for host in ('hA', 'hB')}
    time.sleep(args.settle)
    restarts = Restarts(lab, lc.marker).start()
    tokens = [(owner, token)]
    began = time.monotonic()
    cuts = 0
    try:
        while time.monotonic() - began < args.seconds:
            owner = tokens[-1][0]
            lab.partition([owner])
            cuts += 1
            time.sleep(args.down)
            lab.heal(owner)
            time.sleep(args.up)
            host, token = lc.owner('web', 'hW')
            if token and token != tokens[-1][1]:
                tokens.append((host, token))
                print('%6.1f s: owner %s, token %d' % (
                    time.monotonic() - began, host, token))
                sys.stdout.flush()
    finally:
        lab.heal()
    ended = time.monotonic()
    time.sleep(args.settle)
    restarts.stop()
    host, token = lc.owner('web', 'hW')
    if token and token != tokens[-1][1]:
        tokens.append((host, token))
    for proc in probes.values():
        proc.kill()
        proc.wait()
    seen = {}
    for host in ('hA', 'hB'):
        for i, ok in answers(probes[host].log_path, began, ended).items():
            seen[i] = seen.get(i, False) or ok
    total = int((ended - began) / PROBE_EVERY)
    down = sum(1 for i in range(total) if not seen.get(i, False))
    lost = sum(len(re.findall(r'lease [0-9a-f]+ lost: ', lc.log(h)))
               for h in ('hA', 'hB'))
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
        for h in ('hA', 'hB'):
            with open(os.path.join(args.logs, h + '.log'), 'w') as f:
                f.write(lc.log(h))
    overlaps = [o for o in observer.overlaps if began <= o[0]]
    print('flapping owner link (%g s down, %g s up) for %.0f s, %d cuts:'
          ' owner changes %d, unavailable %.1f %% (%d of %d probe intervals'
          ' of %g s), restarts %d, leases lost %d, double-active %d samples'
          ' (goals: owner changes <= 1, unavailable < 10 %%,'
          ' double-active 0)' % (
              args.down, args.up, ended - began, cuts, len(tokens) - 1,
              100.0 * down / max(total, 1), down, total, PROBE_EVERY,
              restarts.count, lost, len(overlaps)))
    return tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--profile', choices=['default', 'fast'],
                        default='default', help='[lease] profile')
    parser.add_argument('--renew-interval', type=float,
                        help='[lease] renew_interval instead of the'
                        ' profile\'s')
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--down', type=float, default=2.0)
    parser.add_argument('--up', type=float, default=2.0)
    parser.add_argument('--settle', type=float, default=4.0,
                        help='seconds of steady state before and after')
    parser.add_argument('--logs', help='a folder to keep the agents\' logs'
                        ' in')
    args = parser.parse_args()
    with Lab(['hA', 'hB', 'hW'], paths=LAB_PATHS) as lab:
        ReplicationLab(lab, disk_size='256M')
        marker = str(86400 + int(lab.id, 16))
        server = lab.workdir + '/server.py'
        with open(server, 'w') as f:
            f.write(SERVER)
        lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, services={
            'web': SERVICE % (VOL, server, marker)},
            settings='[lease]\nprofile = %s\n%s' % (
                args.profile, 'renew_interval = %g\n' % args.renew_interval
                if args.renew_interval else ''))
        lc.marker = marker
        lc.start()
        observer = Observer(lab, marker, interval=0.05,
                            hosts=('hA', 'hB')).start()
        try:
            flap(lab, lc, observer, args)
        finally:
            observer.stop()
            for host in ('hA', 'hB'):
                lc.stop_agent(host)
    print('machine: %s, %d cores, Python %s, lease profile %s%s, %s' % (
        platform.platform(), os.cpu_count(), platform.python_version(),
        args.profile, ', renew_interval %gs' % args.renew_interval
        if args.renew_interval else '', lc.etcd_binary))


if __name__ == '__main__':
    main()
