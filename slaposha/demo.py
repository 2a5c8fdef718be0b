"""The demo: a SlapOS compute node that survives the loss of its host.

On one machine, in the lab (network and mount namespaces, nothing leaves
it): hA and hB can run the node, hW is a witness (an etcd member only), hM
runs the SlapOS master (slapproxy), hO is a client outside the cluster.
Each node host has its own btrfs disk at /srv; instance_root, /srv/slapgrid,
is a subvolume.

1. SlapOS deploys the node: slapproxy on hM, the real `slapos node format`,
   `slapos node software` and `slapos node instance` on hA build and start
   recordstore, a small software release whose partition stores what it
   is sent (buildout runs as the partition's user);
2. the agents start on hA and hB (each with its etcd member) and the
   witness on hW; hA owns the node: its data goes to hB every second as
   btrfs snapshots, its software release is copied to hB, and hB becomes
   an eligible standby; `slaposha status` shows the tree;
3. hO writes records through the partition; each is acknowledged once on
   disk;
4. hA crashes (link down, every process killed); the demo prints how long
   until the partition answered again, from hB, at the same address, that
   every acknowledged record is there and that no buildout ran on hB;
5. hA comes back (as after a reboot) and becomes hB's standby: the demo
   shows that only the changes were sent to it, not a full copy;
6. everything is torn down.
"""

import contextlib
import json
import re
import sys
import time

from slaposha.lab import Lab, LabError, wait_for

_T0 = time.monotonic()
INTERVAL = 1.0

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#slapgrid]
    volume = /srv/slapgrid
    interval = %g
    [slapos#node]
    [task#slapgrid-instance]
    command = /opt/slapos/bin/slapos node instance --cfg /etc/opt/slapos/slapos.cfg
    schedule = 1h
''' % INTERVAL

# What a buildout run rewrites, read inside a host (its /srv is its disk).
FACTS = '''
import hashlib, json, os
part = '/srv/slapgrid/slappart0'
print(json.dumps({n: [hashlib.sha256(open(os.path.join(part, n), 'rb').read()
                                     ).hexdigest(),
                      os.stat(os.path.join(part, n)).st_mtime]
                  for n in ('.installed.cfg', '.timestamp', 'buildout.cfg')}))
'''


def say(text):
    print('[%6.2fs] %s' % (time.monotonic() - _T0, text))
    sys.stdout.flush()


def show(text):
    print('    ' + text.rstrip().replace('\n', '\n    '))
    sys.stdout.flush()


@contextlib.contextmanager
def _explained(cluster):
    """On a failure, show the end of each agent's log before the lab goes."""
    try:
        yield
    except LabError:
        lc = cluster()
        for host in (lc.hosts if lc is not None else ()):
            print('--- %s: the last lines of its agent log' % host,
                  file=sys.stderr)
            print('\n'.join(lc.log(host).splitlines()[-15:]),
                  file=sys.stderr)
        raise


def main():
    import importlib.util
    if importlib.util.find_spec('slapos.grid') is None:
        print('demo: slapos.core is not installed in this environment (run'
              ' it with tools/demo.sh)', file=sys.stderr)
        return 1
    from slaposha.lab.cluster import LabCluster
    from slaposha.lab.slapos import (
        BTRFS_PATHS, NODE, SR_URL, btrfs_srv, deploy_node, node_install,
        partition_address, post_records, records, route_partitions)
    proxy = lc = None
    say('the SlapOS node install (slapos.core in a virtualenv, shared at %s'
        ' by every host as on identical peers; built once)' % NODE)
    source = node_install()
    try:
        with Lab(['hA', 'hB', 'hW', 'hM', 'hO'], paths=BTRFS_PATHS,
                 shared={NODE: source}) as lab, _explained(lambda: lc):
            say('lab %s: hA hB (node hosts), hW (witness), hM (SlapOS'
                ' master), hO (client); private bridge, no route out'
                % lab.id)
            btrfs_srv(lab, ['hA', 'hB'])
            say('hA and hB each have a btrfs disk at /srv; /srv/slapgrid is'
                ' a subvolume on hA')
            started = time.monotonic()
            proxy = deploy_node(lab, 'hA', 'hM', others=('hB',))
            route_partitions(lab['hO'])
            address = partition_address(0)
            say('SlapOS deployed %s on hA in %.1f s: slapproxy on hM, then'
                ' `slapos node format`, `software`, `instance`'
                % (SR_URL, time.monotonic() - started))
            lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                            services={'comp-lab': SERVICE})
            lc.start()
            say('agents on hA and hB, witness on hW: etcd members, leases,'
                ' TLS between hosts')
            wait_for(lambda: records(lab) is not None, 60,
                     what='the partition answering from hA')

            tree = lc.wait_standby('hB', 'btrfs#slapgrid', 90)
            say('hA owns the node; hB has its software release (copied, not'
                ' built) and its data every %gs: `slaposha status` on hB:'
                % INTERVAL)
            show(tree)

            lab['hA'].run(['dd', 'if=/dev/urandom', 'of=/srv/slapgrid/'
                           'slappart0/srv/dataset', 'bs=1M', 'count=64',
                           'status=none'])
            acked = post_records(lab, ['record-%d' % n
                                       for n in range(1, 201)])
            say('the partition holds 64 MB of data; hO wrote %d records to'
                ' http://%s:8080/records, each acknowledged after fsync'
                % (len(acked), address))
            time.sleep(2 * INTERVAL)  # the next snapshot carries them
            before = json.loads(lab['hA'].run(['python3', '-c',
                                               FACTS]).stdout)

            say('crash hA: link down, every process of hA killed')
            crashed = time.monotonic()
            lab.crash('hA')
            got = wait_for(lambda: records(lab, timeout=0.3) is not None, 60,
                           interval=0.05,
                           what='the partition answering from hB')
            took = time.monotonic() - crashed
            got = records(lab)
            say('the partition answers again from hB %.2f s after the crash,'
                ' at the same address' % took)
            lost = [r for r in acked if r not in got]
            say('acknowledged records on hB: %d of %d%s' % (
                len(acked) - len(lost), len(acked),
                ' (missing: %s)' % ', '.join(lost[:5]) if lost else
                ', none lost'))
            after = json.loads(lab['hB'].run(['python3', '-c',
                                              FACTS]).stdout)
            say('no buildout ran on hB: %s (.installed.cfg, buildout.cfg and'
                ' .timestamp as hA left them)' % (after == before))
            time.sleep(1)
            show(lc.cli('hB', 'status').stdout)

            say('hA comes back, as after a reboot; its agent joins as hB\'s'
                ' standby')
            lab.restart('hA')
            lc.start_agent('hA')
            post_records(lab, ['record-%d' % n for n in range(201, 211)])

            def resynced():
                found = re.findall(r'/srv/slapgrid <- hB: received (\S+)'
                                   r' \(([^)]*)\)', lc.log('hA'))
                return found and found[0]
            name, detail = wait_for(resynced, 90, interval=0.5,
                                    what='hA resynchronised from hB')
            size = lab['hB'].run(['du', '-sh', '--apparent-size',
                                  '/srv/slapgrid']).stdout.split()[0]
            say('hA received %s from hB: %s; the whole volume is %s'
                % (name, detail, size))
            diverged = [line for line in lc.log('hA').splitlines()
                        if 'diverged' in line]
            if diverged:
                say('what hA held that hB never got is kept aside, not'
                    ' discarded: %s' % diverged[0].split(': ', 1)[-1])
            # hA's receiver answers again: the owner's next round finds the
            # software release already there.
            tree = wait_for(lambda: lc.cli('hB', 'status').stdout if
                            'comp-lab   up' in lc.cli('hB', 'status').stdout
                            else None, 60, interval=1,
                            what='the service up with hA as its standby')
            show(tree)
            say('tearing the lab down')
            for host in ('hA', 'hB'):
                lc.stop_agent(host)
            proxy.terminate()
        say('done')
    except LabError as e:
        print('demo: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
