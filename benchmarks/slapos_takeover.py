"""Time from the crash of a SlapOS node's host to its partition answering
from the peer, by number of partitions (issue: a SlapOS node as one
service).

Lab: hA and hB (the node's hosts), hW (witness), hM (slapproxy master), hO
(a client outside the cluster). The node is formatted by the real `slapos
node format`; every partition is started (one supervisord program each);
partition 0 serves HTTP. The agents run the node as a service of one
`slapos` resource. Each run crashes the owner's host and measures until hO
gets partition 0's answer at its address from the peer, then restarts the
crashed host and its agent. Data is copied once (nothing writes here).

    .venv/bin/python benchmarks/slapos_takeover.py [--partitions 1 10 50]
        [--runs 10]
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, wait_for  # noqa: E402
from slaposha.lab.cluster import LabCluster  # noqa: E402
from slaposha.lab.slapos import (  # noqa: E402
    PORT, answer, copy_node, make_node, partition_address, route_partitions)

CLIENT = '''
import sys, time, urllib.request
t0 = time.monotonic()
while time.monotonic() - t0 < 90:
    try:
        urllib.request.urlopen("http://%s:%d/who", timeout=0.3).read()
        print(time.monotonic())
        sys.exit(0)
    except Exception:
        pass
    time.sleep(0.02)
sys.exit(1)
''' % (partition_address(0), PORT)


def measure(count, runs):
    times = []
    with Lab(['hA', 'hB', 'hW', 'hM', 'hO']) as lab:
        proxy = make_node(lab, 'hA', 'hM', partitions=count)
        route_partitions(lab['hO'])
        copy_node(lab, 'hA', 'hB')
        lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'node': '''
            [service]
            hosts = hA hB
            [slapos#node]
        '''}).start()
        try:
            wait_for(lambda: answer(lab) == 'partition data', 120,
                     what='partition answering')
            owner = lc.owner('node', 'hW')[0]
            for run in range(runs):
                time.sleep(3)
                peer = 'hB' if owner == 'hA' else 'hA'
                crashed = time.monotonic()
                lab.crash(owner)
                # Polled from after the crash: the old owner cannot answer.
                client = lab['hO'].spawn(['python3', '-c', CLIENT],
                                         name='client-%d-%d' % (count, run))
                client.wait(120)
                with open(client.log_path) as f:
                    answered = float(f.read().split()[-1])
                times.append(answered - crashed)
                print('%2d partition(s), run %2d: crash %s: partition 0'
                      ' answered from %s after %.2f s' % (
                          count, run + 1, owner, peer, times[-1]))
                sys.stdout.flush()
                lab.restart(owner)
                lc.start_agent(owner)
                lc.wait_agent(owner)
                owner = peer
        finally:
            for host in ('hA', 'hB'):
                lc.stop_agent(host)
            proxy.terminate()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--partitions', type=int, nargs='+',
                        default=[1, 10, 50])
    parser.add_argument('--runs', type=int, default=10)
    args = parser.parse_args()
    results = {}
    for count in args.partitions:
        results[count] = measure(count, args.runs)
    print()
    print('partitions | runs | median (s) | max (s)')
    for count, times in results.items():
        print('%10d | %4d | %10.2f | %7.2f' % (
            count, len(times), statistics.median(times), max(times)))
    print('machine: %s, %d cores, Python %s; lease TTL 3 s' % (
        platform.platform(), os.cpu_count(), platform.python_version()))


if __name__ == '__main__':
    main()
