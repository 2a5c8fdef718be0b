"""The demo: a SlapOS compute node that survives the loss of its host.

On one machine, in the lab (network and mount namespaces, nothing leaves
it): hA and hB can run the node, hW is a witness (an etcd member only), hM
runs the SlapOS master (slapproxy), hO is a client outside the cluster.

1. hM starts slapproxy; hA is formatted by the real `slapos node format`
   and runs a partition that serves its data over HTTP;
2. the agents start on hA and hB (each with its etcd member) and the
   witness on hW; hA takes the node; `slaposha status` shows the tree;
3. hA crashes (link down, every process killed); the demo prints how long
   until the partition answers again, from hB, at the same address, with
   its data, and that no buildout ran there;
4. everything is torn down.

Until the data resource lands here, the demo copies the node's folders to
the standby itself before the crash (nothing writes meanwhile).
"""

import os
import sys
import time

from slaposha.lab import Lab, LabError, wait_for

_T0 = time.monotonic()


def say(text):
    print('[%6.2fs] %s' % (time.monotonic() - _T0, text))
    sys.stdout.flush()


def main():
    import importlib.util
    if importlib.util.find_spec('slapos.grid') is None:
        print('demo: slapos.core is not installed in this environment (run'
              ' it with tools/demo.sh)', file=sys.stderr)
        return 1
    from slaposha.lab.cluster import LabCluster
    from slaposha.lab.slapos import (
        answer, copy_node, make_node, partition_address, route_partitions)
    proxy = lc = None
    try:
        with Lab(['hA', 'hB', 'hW', 'hM', 'hO']) as lab:
            say('lab %s: hA hB (node hosts), hW (witness), hM (SlapOS'
                ' master), hO (client); private bridge, no route out'
                % lab.id)
            proxy = make_node(lab, 'hA', 'hM', partitions=2)
            route_partitions(lab['hO'])
            address = partition_address(0)
            say('hM runs slapproxy; `slapos node format` made 2 partitions'
                ' on hA; slappart0 serves at %s:8080' % address)
            copy_node(lab, 'hA', 'hB')
            say('the node\'s folders are on hB too (the data resource will'
                ' keep them in step)')
            lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={
                'comp-lab': '''
                    [service]
                    hosts = hA hB
                    [slapos#node]
                '''})
            lc.start()
            say('agents on hA and hB, witness on hW: etcd members, leases')
            wait_for(lambda: answer(lab) == 'partition data', 60,
                     what='the partition answering from hA')
            say('hO asks %s:8080/who -> "%s"' % (address, answer(lab)))
            time.sleep(1.5)
            print(lc.cli('hB', 'status').stdout.rstrip())
            stamp = os.stat(lab['hB'].path(
                '/srv/slapgrid/slappart0/.timestamp')).st_mtime
            say('crash hA: link down, every process of hA killed')
            crashed = time.monotonic()
            lab.crash('hA')
            wait_for(lambda: answer(lab, timeout=0.3) == 'partition data',
                     60, interval=0.05, what='the partition answering from'
                     ' hB')
            took = time.monotonic() - crashed
            say('the partition answers again from hB %.2f s after the crash,'
                ' same address, same data' % took)
            ran_buildout = os.path.exists(lab['hB'].path(
                '/srv/slapgrid/slappart0/.installed.cfg')) or os.stat(
                lab['hB'].path('/srv/slapgrid/slappart0/.timestamp')
            ).st_mtime != stamp
            say('no buildout ran on hB: %s (.timestamp untouched)'
                % (not ran_buildout))
            time.sleep(1)
            print(lc.cli('hB', 'status').stdout.rstrip())
            say('tearing the lab down')
            lc.stop_agent('hB')
            proxy.terminate()
        say('done')
    except LabError as e:
        print('demo: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
