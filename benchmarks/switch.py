"""Planned switch time of a service of ip + fs (bind) + app (issue: the
agent).

Two hosts and a witness, real etcd members and agents, a client host
outside the cluster. Each run is `slaposha switch web --to <other>` from
the target host; the time is from the command's start until the client sees
the service answer from the new host at its address.

    .venv/bin/python benchmarks/switch.py [--runs 10]
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, web  # noqa: E402
from slaposha.lab.cluster import (  # noqa: E402
    LabCluster, Observer, check_no_overlap, holds_address)

VIP = web.VIP

CLIENT = '''
import sys, time, urllib.request
want = sys.argv[1]
t0 = time.monotonic()
while time.monotonic() - t0 < 60:
    try:
        got = urllib.request.urlopen("http://%s:8080/who", timeout=0.5).read()
        if got.decode().strip() == want:
            print(time.monotonic())
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.01)
sys.exit(1)
''' % VIP


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=10)
    args = parser.parse_args()
    times = []
    with Lab(['hA', 'hB', 'hW', 'hO']) as lab:
        web.prepare(lab)
        lc = LabCluster(lab, ['hA', 'hB'], ['hW'],
                        services={'web': web.SERVICE}).start()
        observer = Observer(lab, probe=holds_address(VIP),
                            hosts=['hA', 'hB']).start()
        try:
            owner = lc.wait_owner('web', 'hW', timeout=60)[0]
            observer.wait_running(owner, 30)
            for run in range(args.runs):
                time.sleep(1)
                to = 'hB' if owner == 'hA' else 'hA'
                client = lab['hO'].spawn(['python3', '-c', CLIENT,
                                          'served by %s' % to],
                                         name='client%d' % run)
                began = time.monotonic()
                lc.cli(to, 'switch', 'web', '--to', to)
                client.wait(60)
                with open(client.log_path) as f:
                    answered = float(f.read().split()[-1])
                times.append(answered - began)
                print('run %2d: switch to %s: answered after %.2f s'
                      % (run + 1, to, answered - began))
                sys.stdout.flush()
                owner = to
            check_no_overlap(observer)
        finally:
            observer.stop()
            for host in ('hA', 'hB'):
                lc.stop_agent(host)
    print('planned switch of ip + fs + app, %d runs: median %.2f s, max %.2f'
          ' s, min %.2f s (address never on both hosts: checked every 20 ms)'
          % (len(times), statistics.median(times), max(times), min(times)))
    print('machine: %s, %d cores, Python %s' % (
        platform.platform(), os.cpu_count(), platform.python_version()))


if __name__ == '__main__':
    main()
