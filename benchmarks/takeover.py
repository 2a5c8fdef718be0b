"""Takeover time after the owner's host crashes (issue: coordination).

Two hosts and a witness in the lab, real etcd members and agents, default
lease timings (TTL 3 s, renew 1 s). Each run crashes the current owner's
host (link down, SIGKILL of all its processes), measures until an observer
outside every host sees the service's process on the peer, then restarts
the crashed host and its agent and lets the cluster settle.

    .venv/bin/python benchmarks/takeover.py [--runs 10] [--settle 4]

Prints every run, then median and max. Target: median at most 3.5 s.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab  # noqa: E402
from slaposha.lab.cluster import LabCluster, Observer, check_no_overlap  # noqa


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--settle', type=float, default=4.0,
                        help='seconds of steady state before each crash')
    args = parser.parse_args()
    times = []
    with Lab(['hA', 'hB', 'hW']) as lab:
        marker = str(86400 + int(lab.id, 16))
        lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
            [service]
            hosts = hA hB
            [app#main]
            command = exec sleep %s
        ''' % marker}).start()
        observer = Observer(lab, marker, interval=0.01).start()
        try:
            owner = lc.wait_owner('web', 'hW', timeout=60)[0]
            observer.wait_running(owner, 30)
            for run in range(args.runs):
                time.sleep(args.settle)
                peer = 'hB' if owner == 'hA' else 'hA'
                leader = lc.etcd_leader('hW')
                observer.first.pop(peer, None)
                crashed = time.monotonic()
                lab.crash(owner)
                observer.wait_running(peer, 30)
                took = observer.first[peer] - crashed
                times.append(took)
                print('run %2d: crash %s (etcd leader %s): %s answered after'
                      ' %.2f s' % (run + 1, owner, leader, peer, took))
                sys.stdout.flush()
                lab.restart(owner)
                lc.start_agent(owner)
                owner = peer
            check_no_overlap(observer)
        finally:
            observer.stop()
            for host in ('hA', 'hB'):
                lc.stop_agent(host)
    print('takeover after owner crash, %d runs: median %.2f s, max %.2f s,'
          ' min %.2f s (target: median <= 3.5 s)' % (
              len(times), statistics.median(times), max(times), min(times)))
    print('machine: %s, %d cores, Python %s, etcd lease TTL 3 s, renew 1 s,'
          ' election timeout 500 ms' % (platform.platform(), os.cpu_count(),
                                        platform.python_version()))


if __name__ == '__main__':
    main()
