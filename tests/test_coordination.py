"""Coordination on real etcd members in the lab: the ownership protocol of
DESIGN.md 2 under etcd leader loss, host crash, partition and a frozen
agent. A service never runs on two hosts at once (an observer outside every
host checks every 20 ms) and a deposed owner cannot write."""

import json
import os
import signal
import sys
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import (
    SYSTEM_ETCD, LabCluster, Observer, check_no_overlap, marked_pids)

pytestmark = pytest.mark.lab

TTL = 3.0


def service(marker):
    return {'web': '''
        [service]
        hosts = hA hB
        [app#main]
        command = exec sleep %s
    ''' % marker}


@pytest.fixture
def cluster(make_lab):
    """Two hosts and a witness, agents started, web running on hA."""
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services=service(marker))
    lc.marker = marker
    lc.start()
    observer = Observer(lab, marker).start()
    lc.observer = observer
    try:
        assert lc.wait_owner('web', 'hW')[0] == 'hA'
        observer.wait_running('hA', 20)
        yield lc
    finally:
        observer.stop()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
        # Shown by pytest only when the test failed.
        for host in ('hA', 'hB'):
            print('---- agent log of %s\n%s' % (host, lc.log(host)[-4000:]))


def service_pid(lc, host):
    pids = marked_pids(lc.lab[host], lc.marker)
    return pids[0] if pids else None


def test_etcd_leader_loss_does_not_move_the_service(cluster):
    lc = cluster
    _, token = lc.owner('web', 'hW')
    pid = service_pid(lc, 'hA')
    # Kill a leader on another host than the owner's, as the test means to.
    leader = lc.etcd_leader('hW')
    if leader == 'hA':
        lc.move_leader('hB', 'hW')
        leader = 'hB'
        time.sleep(2)  # one leader change at a time: renewals land first
    os.kill(lc.etcd_pid(leader), signal.SIGKILL)
    killed = time.monotonic()
    while time.monotonic() - killed < 8:
        assert service_pid(lc, 'hA') == pid, 'the service restarted'
        time.sleep(0.1)
    via = 'hW' if leader != 'hW' else 'hB'
    assert lc.owner('web', via) == ('hA', token)
    assert lc.observer.where() == ['hA']
    assert 'fence' not in lc.log('hA') and 'lease lost' not in lc.log('hA')


# Follows the owner key from a host: the time from its deletion (the lost
# lease) to the next owner's key, both as etcd told this watcher.
OWNER_WATCH = '''
import json, sys, time
from slaposha.config import load_cluster
from slaposha.cluster.etcd import Client
from slaposha.cluster.keys import Keys
cluster = load_cluster(sys.argv[1])
endpoints = cluster.etcd_endpoints()
mine = endpoints.pop(cluster.members.index(sys.argv[2]))
client = Client([mine] + endpoints, timeout=5)  # not the member that dies
key = Keys(cluster.etcd.prefix, cluster.name).owner('web')
start = client.revision() + 1
print('watching', flush=True)
deleted = None
for event in client.watch(key, start_revision=start, timeout=60):
    if event.type == 'DELETE':
        deleted = time.monotonic()
    elif deleted is not None:
        print(json.dumps([event.value, time.monotonic() - deleted]), flush=True)
        break
'''


def test_owner_host_crash_moves_the_service_with_a_larger_token(cluster):
    lc = cluster
    _, token = lc.owner('web', 'hW')
    watcher = lc.lab['hW'].spawn([sys.executable, '-c', OWNER_WATCH,
                                  lc.cluster_file, 'hW'], name='owner-watch',
                                 env=lc.env())
    wait_for(lambda: 'watching' in open(watcher.log_path).read(), 20,
             what='owner watch ready')
    lc.lab.crash('hA')
    crashed = time.monotonic()
    host, new_token = lc.wait_owner('web', 'hW', not_host='hA')
    assert host == 'hB'
    assert new_token > token
    lc.observer.wait_running('hB', 20)
    print('takeover after crash: %.2f s' % (lc.observer.first['hB'] - crashed))
    check_no_overlap(lc.observer)
    # hB follows the owner key with a watch: it took the service within
    # milliseconds of the key's deletion (as when it read etcd every
    # 0.1 s), not at its next timed check.
    watcher.wait(20)
    new_owner, reaction = json.loads(open(watcher.log_path).read().split(
        '\n')[-2])
    print('owner key deleted, retaken by %s %.3f s later' % (new_owner,
                                                            reaction))
    assert new_owner == 'hB' and reaction < 0.5


def test_partitioned_owner_stops_before_the_other_side_starts(cluster):
    lc = cluster
    lc.lab.partition(['hA'])
    cut = time.monotonic()
    lc.observer.wait_running('hB', 20)
    stopped_a = lc.observer.last['hA']
    started_b = lc.observer.first['hB']
    assert not lc.observer.running_on(lc.lab['hA'])
    assert stopped_a < started_b, (stopped_a - cut, started_b - cut)
    print('hA stopped %.2f s after the cut, hB started %.2f s after it'
          % (stopped_a - cut, started_b - cut))
    # The owner fenced itself by its deadline, before its lease expired.
    assert stopped_a - cut < TTL
    assert lc.owner('web', 'hW')[0] == 'hB'
    # Cut off, hA's status says it has no quorum and why web stopped there.
    cut_off = lc.cli('hA', 'status').stdout
    assert 'etcd cannot read the cluster' in cut_off, cut_off
    assert 'cluster view unavailable' in cut_off
    assert 'lease lost' in cut_off
    lc.lab.heal()
    healed = time.monotonic()
    while time.monotonic() - healed < 5:
        assert not lc.observer.running_on(lc.lab['hA'])
        time.sleep(0.1)
    assert lc.observer.where() == ['hB']
    check_no_overlap(lc.observer)
    assert 'lease lost' in lc.log('hA')


def test_frozen_agent_is_fenced_by_its_watchdog(cluster):
    lc = cluster
    _, stale_token = lc.owner('web', 'hW')
    agent = lc.agent_pid('hA')
    os.kill(agent, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        lc.observer.wait_running('hB', 20)
        # The agent could not act: its watchdog stopped the service.
        assert not lc.observer.running_on(lc.lab['hA'])
        assert lc.observer.last['hA'] < lc.observer.first['hB']
        assert lc.observer.last['hA'] - frozen < TTL
        host, token = lc.owner('web', 'hW')
        assert host == 'hB' and token > stale_token
    finally:
        os.kill(agent, signal.SIGCONT)
    # A write under the stale token is refused (the test tries it).
    refused = lc.query('hW', '''
        from slaposha.cluster.lease import Ownership
        own = Ownership(client, keys, 'web', 'hA')
        result = own.write('state', 'stale owner speaking', token=%d)
    ''' % stale_token)
    assert refused is False
    resumed = time.monotonic()
    while time.monotonic() - resumed < 5:
        assert not lc.observer.running_on(lc.lab['hA'])
        time.sleep(0.1)
    assert lc.owner('web', 'hW')[0] == 'hB'
    state = lc.query('hW', '''
        kv = client.get(keys.service('web', 'state'))
        result = kv.value if kv else None
    ''')
    assert 'stale owner' not in (state or '')
    check_no_overlap(lc.observer)
    assert 'watchdog' in lc.log('hA') and 'no renewal' in lc.log('hA')


def test_killed_agent_leaves_no_service_behind(cluster):
    """SIGKILL of the agent alone (not the host): its watchdog fences the
    service at the deadline, then the other host takes over."""
    lc = cluster
    lc.agents['hA'].kill()
    killed = time.monotonic()
    lc.observer.wait_running('hB', 20)
    assert lc.observer.last['hA'] < lc.observer.first['hB']
    assert lc.observer.last['hA'] - killed < TTL
    assert not lc.observer.running_on(lc.lab['hA'])
    check_no_overlap(lc.observer)
    assert 'agent gone' in lc.log('hA')


def test_raft_leadership_moves_off_the_owner(cluster):
    lc = cluster
    # Put the leadership on the owner: it hands it away within a few
    # monitor intervals (leader_placement = away).
    lc.move_leader('hA', 'hW')
    leader = wait_for(lambda: (lambda name: name if name and name != 'hA'
                               else None)(lc.etcd_leader('hW')), 25,
                      interval=0.5, what='etcd leader off hA')
    assert leader in ('hW', 'hB')


def test_members_and_agents_talk_tls_with_the_cluster_ca(make_lab):
    """Also the test that keeps Debian 12's etcd 3.4 working, with its
    warning (the rest of the lab runs 3.5, which has the lease-safety
    fixes)."""
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services=service(marker),
                    tls=True, etcd_binary=SYSTEM_ETCD).start()
    try:
        host, token = lc.wait_owner('web', 'hW')
        assert host == 'hA' and token
        wait_for(lambda: Observer(lab, marker).running_on(lab['hA']), 10,
                 what='web running on hA')
        assert 'etcd 3.4.23 at %s lacks the lease-safety fixes' % SYSTEM_ETCD \
            in lc.log('hA')
        assert lc.query('hW', 'result = client.status().version') == '3.4.23'

        # Plain HTTP, and TLS without a client certificate, are refused.
        probe = '''
            import requests
            url = 'https://%s:2379/v3/kv/range'
            outcomes = []
            for kwargs in ({'verify': cluster.tls_files('hW')[0]},
                           {'verify': False}):
                try:
                    requests.post(url, json={'key': 'eA=='}, timeout=2,
                                  **kwargs)
                    outcomes.append('answered')
                except requests.RequestException as e:
                    outcomes.append('refused')
            try:
                requests.post(url.replace('https', 'http'),
                              json={'key': 'eA=='}, timeout=2)
                outcomes.append('answered')
            except requests.RequestException:
                outcomes.append('refused')
            result = outcomes
        ''' % lab['hA'].address
        assert lc.query('hW', probe) == ['refused', 'refused', 'refused']
        members = lc.query('hW', '''
            result = sorted(u for m in client.members() for u in m.peer_urls)
        ''')
        assert members and all(u.startswith('https://') for u in members)
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_external_etcd_cluster(make_lab):
    """[etcd] mode = external: the agents run no member of their own and
    use the endpoints given; ownership works the same."""
    lab = make_lab(['hA', 'hB', 'hE'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], services=service(marker),
                    external_etcd='hE').start()
    observer = Observer(lab, marker).start()
    try:
        assert lc.wait_owner('web', 'hE')[0] == 'hA'
        observer.wait_running('hA', 20)
        assert lc.etcd_pid('hA') is None and lc.etcd_pid('hB') is None
        lab.crash('hA')
        observer.wait_running('hB', 20)
        check_no_overlap(observer)
    finally:
        observer.stop()
        lc.stop_agent('hB')


def test_operators_act_through_the_https_api_with_their_role(make_lab,
                                                             tmp_path):
    """The CLI over HTTPS with an operator's certificate: an operator may
    switch, a guest may only look."""
    import subprocess
    import sys
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services=service(marker),
                    tls=True).start()
    try:
        assert lc.wait_owner('web', 'hW')[0] == 'hA'
        folders = {}
        for name, role in (('alice', 'operator'), ('bob', 'guest')):
            folders[name] = str(tmp_path / name)
            subprocess.run(lc.command('cert', 'issue', name, '--role', role,
                                      '--dir', folders[name]),
                           env=lc.env(), check=True, stdout=subprocess.PIPE)

        def cli(who, *args):
            env = dict(lc.env(), SLAPOSHA_CERT_DIR=folders[who])
            return lab['hW'].run([sys.executable, '-m', 'slaposha.cli.main',
                                  '-c', lc.cluster_file, '--api', 'hA']
                                 + list(args), env=env, check=False,
                                 timeout=120)
        tree = wait_for(lambda: (lambda p: p.returncode == 0 and
                                 'on hA' in p.stdout and p.stdout)(
                                     cli('bob', 'status')), 20,
                        interval=0.5, what='status over HTTPS')
        assert '(seen from hA)' in tree
        refused = cli('bob', 'switch', 'web', '--to', 'hB')
        assert refused.returncode == 2
        assert refused.stderr.count('\n') == 1 and '403' in refused.stderr
        moved = cli('alice', 'switch', 'web', '--to', 'hB')
        assert moved.returncode == 0, moved.stderr
        assert 'runs on hB' in moved.stdout
        assert lc.owner('web', 'hW')[0] == 'hB'
        # The decision log of hA, read by a guest over HTTPS.
        log = cli('bob', 'log').stdout
        assert 'hA web: start: took the owner key' in log
        assert 'hA web: switch: moving it to hB, as operator alice' in log
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
