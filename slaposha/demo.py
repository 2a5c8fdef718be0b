"""The demo: a SlapOS compute node that survives the loss of its host.

On one machine, in the lab (network and mount namespaces, nothing leaves
it): hA and hB can run the node, hW is a witness (an etcd member only), hM
runs the SlapOS master (slapproxy), hO is a client outside the cluster.
Each node host has its own btrfs disk at /srv and its own /etc;
instance_root, /srv/slapgrid, is a subvolume.

1. SlapOS deploys the node as it is usually installed: slapproxy on hM,
   the real `slapos node format` (it chooses the partition's addresses and
   creates the users slapsoft and slapuser0), `slapos node software` and
   `slapos node instance` on hA build and start recordstore, a small
   software release whose partition stores what it is sent (buildout runs
   as the partition's user); the package's cron file runs slapgrid;
2. the operator's commands: `slaposha slapos adopt` on hA prints the plan
   and, with --apply, pins the addresses, disables the cron entries and
   writes the service file; `slaposha slapos prepare-standby` on hB, from
   hA's fingerprint, creates the users with hA's uids and gids;
3. the agents start on hA and hB (each with its etcd member) and the
   witness on hW; hA owns the node: its data goes to hB every second as
   btrfs snapshots, its software release is copied to hB, and hB becomes
   an eligible standby; `slaposha status` shows the tree;
4. hO writes records through the partition; each is acknowledged once on
   disk;
5. hA crashes (link down, every process killed); the demo prints how long
   until the partition answered again, from hB, at the same address, that
   every acknowledged record is there and that no buildout ran on hB;
6. hA comes back (as after a reboot) and becomes hB's standby: the demo
   shows that only the changes were sent to it, not a full copy;
7. everything is torn down.
"""

import contextlib
import re
import sys
import time

from slaposha.lab import Lab, LabError, wait_for

_T0 = time.monotonic()
INTERVAL = 1.0

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
        BTRFS_PATHS, NODE, SR_URL, btrfs_srv, buildout_facts, deploy_node,
        node_address, node_install, post_records, records, route_partitions)
    proxy = lc = None
    say('the SlapOS node install (slapos.core in a virtualenv, shared at %s'
        ' by every host as on identical peers; built once)' % NODE)
    source = node_install()
    try:
        with Lab(['hA', 'hB', 'hW', 'hM', 'hO'], paths=BTRFS_PATHS,
                 shared={NODE: source}, layers=('/etc',)) as lab, \
                _explained(lambda: lc):
            say('lab %s: hA hB (node hosts), hW (witness), hM (SlapOS'
                ' master), hO (client); private bridge, no route out'
                % lab.id)
            btrfs_srv(lab, ['hA', 'hB'])
            say('hA and hB each have a btrfs disk at /srv; /srv/slapgrid is'
                ' a subvolume on hA')
            started = time.monotonic()
            proxy = deploy_node(lab, 'hA', 'hM', others=(), usual=True)
            route_partitions(lab['hO'])
            address = node_address(lab, 'hA')
            say('SlapOS deployed %s on hA in %.1f s as a node is usually'
                ' installed: slapproxy on hM, `slapos node format` (its'
                ' users and addresses), `software`, `instance`, the cron file'
                % (SR_URL, time.monotonic() - started))
            lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True)
            say('on hA: `slaposha slapos adopt` prints the plan:')
            show(lc.cli('hA', 'slapos', 'adopt').stdout.split(
                '\nWhat changes')[0])
            say('on hA: `slaposha slapos adopt --apply`:')
            show(lc.cli('hA', 'slapos', 'adopt', '--apply').stdout)
            fingerprint = lc.cli('hA', 'slapos', 'fingerprint').stdout
            with open(lab['hB'].path('/var/lib/slaposha/owner.json'),
                      'w') as f:
                f.write(fingerprint)
            say('on hB: `slaposha slapos prepare-standby --reference'
                ' owner.json --apply` (hA\'s fingerprint):')
            show(lc.cli('hB', 'slapos', 'prepare-standby', '--reference',
                        '/var/lib/slaposha/owner.json', '--apply').stdout)
            lc.start()
            say('agents on hA and hB, witness on hW: etcd members, leases,'
                ' TLS between hosts')
            wait_for(lambda: records(lab, address=address) is not None, 60,
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
                                       for n in range(1, 201)],
                                 address=address)
            say('the partition holds 64 MB of data; hO wrote %d records to'
                ' http://%s:8080/records, each acknowledged after fsync'
                % (len(acked), address))
            time.sleep(2 * INTERVAL)  # the next snapshot carries them
            before = buildout_facts(lab, 'hA')

            say('crash hA: link down, every process of hA killed')
            crashed = time.monotonic()
            lab.crash('hA')
            got = wait_for(lambda: records(lab, timeout=0.3,
                                           address=address) is not None,
                           60, interval=0.05,
                           what='the partition answering from hB')
            took = time.monotonic() - crashed
            got = records(lab, address=address)
            say('the partition answers again from hB %.2f s after the crash,'
                ' at the same address' % took)
            lost = [r for r in acked if r not in got]
            say('acknowledged records on hB: %d of %d%s' % (
                len(acked) - len(lost), len(acked),
                ' (missing: %s)' % ', '.join(lost[:5]) if lost else
                ', none lost'))
            after = buildout_facts(lab, 'hB')
            say('no buildout ran on hB: %s (.installed.cfg, buildout.cfg and'
                ' .timestamp as hA left them)' % (after == before))
            time.sleep(1)
            show(lc.cli('hB', 'status').stdout)

            say('hA comes back, as after a reboot; its agent joins as hB\'s'
                ' standby')
            lab.restart('hA')
            lc.start_agent('hA')
            post_records(lab, ['record-%d' % n for n in range(201, 211)],
                         address=address)

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
            # software release already there, and reports hA's copy, one of
            # hB's snapshots (named <seq>-<hB's token>).
            def standby():
                out = lc.cli('hB', 'status').stdout
                token = re.search(r'comp-lab   up       on hB \(token'
                                  r' (\d+)\)', out)
                return token and re.search(r'hA: \d+-%s, ' % token.group(1),
                                           out) and out
            tree = wait_for(standby, 60, interval=1,
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
