"""A SlapOS node installed the usual way, adopted, taken over, released.

hA runs a node as SlapOS installs one: the real slapproxy master (hM), the
real `slapos node format` choosing the addresses and creating the users
(slapsoft, slapuser0: each lab host has /etc of its own), `slapos node
software` and `instance` deploying recordstore, the package's cron file,
instance_root a folder on hA's btrfs disk. Then, as an operator would:

- `slaposha slapos adopt` prints the plan; --apply refuses until --convert,
  which refuses while the node's programs run; with them stopped it makes
  instance_root a subvolume, pins the addresses, disables the cron entries
  and writes the service file; again, it has nothing left to do;
- `slaposha slapos prepare-standby` on hB, from hA's fingerprint, creates
  the users with hA's ids; once the agents run, `slaposha slapos check`
  passes on hB;
- hA crashes: the partition answers from hB with every acknowledged
  record, no buildout; `slapos node format` there keeps the addresses;
- `slaposha slapos release` on hB, the service stopped, gives a plain
  SlapOS node back: cron file there, programs outside the agents' cgroups,
  still answering once the agents are gone, and slapgrid's own run finds
  it up to date.
"""

import json
import os
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import LabCluster
from slaposha.lab.slapos import (
    BTRFS_PATHS, NODE, btrfs_srv, buildout_facts, deploy_node, node_address,
    node_install, post_records, records, route_partitions, slapgrid)

pytestmark = pytest.mark.lab

pytest.importorskip('slapos.grid.svcbackend',
                    reason='slapos.core is not installed')

CFG = '/etc/opt/slapos/slapos.cfg'
facts = buildout_facts


def addresses(lab, host):
    """Partition 0's addresses and IPv6 range, as format recorded them."""
    res = json.loads(lab[host].run(['cat', '/srv/slapgrid/slappart0/'
                                    '.slapos-resource']).stdout)
    return res['address_list'], res.get('ipv6_range')


def ids(lab, host, *users):
    return [lab[host].run(['id', '-u', u]).stdout.strip() + ':' +
            lab[host].run(['id', '-g', u]).stdout.strip() for u in users]


def test_a_node_installed_the_usual_way_is_adopted_taken_over_released(
        make_lab):
    lab = make_lab(['hA', 'hB', 'hW', 'hM', 'hO'], paths=BTRFS_PATHS,
                   shared={NODE: node_install()}, layers=('/etc',))
    btrfs_srv(lab, ['hA', 'hB'], first=None)
    proxy = deploy_node(lab, 'hA', 'hM', others=(), usual=True)
    route_partitions(lab['hO'])
    address = node_address(lab, 'hA')
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True, settings='''
        [agent]
        monitor_interval = 0.5
    ''')

    def sha(host, *args, check=True):
        return lc.cli(host, *args, check=check)

    try:
        wait_for(lambda: records(lab, address=address) is not None, 60,
                 what='the partition answering on hA')
        acked = post_records(lab, ['r%d' % n for n in range(20)],
                             address=address)
        assert len(acked) == 20
        cron_text = lab['hA'].run(['cat', '/etc/cron.d/slapos-node']).stdout

        # The plan, then --apply: refused until --convert, nothing changed.
        plan = sha('hA', 'slapos', 'adopt', '--host', 'hA').stdout
        assert 'adopt COMP-LAB (%s) as service comp-lab' % CFG in plan, plan
        assert 'users with the same uids and gids' in plan
        assert 'not a subvolume' in plan and '--convert' in plan
        refused = sha('hA', 'slapos', 'adopt', '--host', 'hA', '--apply',
                      check=False)
        assert refused.returncode == 2 and '--convert' in refused.stderr
        assert lab['hA'].run(['cat', '/etc/cron.d/slapos-node']).stdout == \
            cron_text
        # --convert with the node running: its cron entries are disabled,
        # its programs must be stopped first.
        running = sha('hA', 'slapos', 'adopt', '--host', 'hA', '--apply',
                      '--convert', check=False)
        assert running.returncode == 2, running.stdout
        assert 'stop its programs first' in running.stderr
        assert '#slaposha-disabled# * * * * * root /opt/slapos/bin/slapos' \
            ' node instance' in lab['hA'].run(
                ['cat', '/etc/cron.d/slapos-node']).stdout
        lab['hA'].run([NODE + '/bin/slapos', 'node', 'supervisorctl',
                       '--cfg', CFG, 'shutdown'])
        wait_for(lambda: records(lab, address=address, timeout=0.5) is None,
                 20, what='the node stopped')
        # supervisord goes on a moment after its programs (log, socket):
        # adopt refuses to copy the data while anything uses it.
        wait_for(lambda: lab['hA'].run(['test', '-e', '/srv/slapgrid/sv.sock'],
                                       check=False).returncode,
                 20, what='the instance supervisord gone')
        done = sha('hA', 'slapos', 'adopt', '--host', 'hA', '--apply',
                   '--convert').stdout
        assert '/srv/slapgrid is now a btrfs subvolume' in done, done
        assert 'ino: 256' in lab['hA'].run(['stat', '-c', 'ino: %i',
                                            '/srv/slapgrid']).stdout
        assert 'input_definition_file = /etc/opt/slapos/' \
            'slaposha-definition.cfg' in lab['hA'].run(['cat', CFG]).stdout
        again = sha('hA', 'slapos', 'adopt', '--host', 'hA', '--apply')
        assert 'service:' not in again.stdout and 'cron:' not in \
            again.stdout, again.stdout
        service = open(os.path.join(lc.config_dir, 'services',
                                    'comp-lab.cfg')).read()
        for line in ('hosts = hA hB', 'exclusive = slapos-node',
                     'volume = /srv/slapgrid', '[slapos#node]',
                     '[task#instance]', 'schedule = 1m', '[task#report]',
                     'schedule = 1h'):
            assert line in service, service

        # hB prepared from hA's fingerprint.
        fp = sha('hA', 'slapos', 'fingerprint').stdout
        with open(lab['hB'].path('/var/lib/slaposha') + '/owner.json',
                  'w') as f:
            f.write(fp)
        reference = '/var/lib/slaposha/owner.json'
        # An account of hB's own holds slapsoft's uid: said, not done.
        uid = lab['hA'].run(['id', '-u', 'slapsoft']).stdout.strip()
        lab['hB'].run(['useradd', '-r', '-M', '-u', uid, 'someone'])
        plan = sha('hB', 'slapos', 'prepare-standby', '--reference',
                   reference).stdout
        assert 'user slapuser0 with uid' in plan, plan
        assert '[ !! ] uid %s of user slapsoft is user someone here: free' \
            ' it' % uid in plan, plan
        lab['hB'].run(['userdel', 'someone'])
        sha('hB', 'slapos', 'prepare-standby', '--reference', reference,
            '--apply')
        assert ids(lab, 'hB', 'slapsoft', 'slapuser0') == \
            ids(lab, 'hA', 'slapsoft', 'slapuser0')

        lc.start()
        wait_for(lambda: records(lab, address=address) is not None, 60,
                 what='the partition answering from hA under the agent')
        lc.wait_standby('hB', 'btrfs#slapgrid', 90)
        check = sha('hB', 'slapos', 'check', '--reference', reference,
                    check=False)
        assert check.returncode == 0, check.stdout
        acked += post_records(lab, ['r%d' % n for n in range(20, 40)],
                              address=address)
        assert len(acked) == 40
        before = facts(lab, 'hA')
        time.sleep(3)  # the next snapshots carry them

        lab.crash('hA')
        crashed = time.monotonic()
        wait_for(lambda: records(lab, address=address, timeout=0.3), 60,
                 interval=0.1, what='the partition answering from hB')
        print('\nanswered from hB %.2f s after hA crashed'
              % (time.monotonic() - crashed))
        assert records(lab, address=address)[:40] == acked
        assert facts(lab, 'hB') == before
        pinned = addresses(lab, 'hB')
        slapgrid(lab['hB'], 'node', 'format', '--now')
        assert addresses(lab, 'hB') == pinned
        assert records(lab, address=address) is not None

        # Back to a plain SlapOS node on hB (hA is back, without its agent:
        # the last snapshot of the stop is refused at once, not waited for).
        lab.restart('hA')
        sha('hB', 'stop', 'comp-lab', '--timeout', '60')
        plan = sha('hB', 'slapos', 'release', '--host', 'hB').stdout
        assert '/etc/cron.d/slapos-node written back' in plan, plan
        released = sha('hB', 'slapos', 'release', '--host', 'hB', '--apply')
        assert 'released: a plain SlapOS node on hB' in released.stdout, \
            released.stdout
        assert lab['hB'].run(['cat', '/etc/cron.d/slapos-node']).stdout == \
            cron_text
        wait_for(lambda: records(lab, address=address), 30,
                 what='the plain node answering on hB')
        assert records(lab, address=address)[:40] == acked
        assert 'FROZEN by slaposha slapos release on hB' in \
            sha('hB', 'status').stdout
        pid = lab['hB'].run(['cat', '/srv/slapgrid/var/run/supervisord.pid'
                             ]).stdout.strip()
        assert '/slaposha/' not in lab['hB'].run(
            ['cat', '/proc/%s/cgroup' % pid]).stdout
        for host in ('hB',):
            lc.stop_agent(host)
        time.sleep(1)
        assert records(lab, address=address)[:40] == acked
        # What cron runs every minute finds the partition up to date.
        slapgrid(lab['hB'], 'node', 'instance')
        assert facts(lab, 'hB') == before
        assert records(lab, address=address) is not None
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
            print('---- agent log of %s\n%s' % (host, lc.log(host)[-3000:]))
        proxy.terminate()
