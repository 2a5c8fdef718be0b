"""Placement: services that exclude each other on one host (N node hosts
and one spare).

The choice is checked on its own, the claim against a real etcd (two
services racing for one host, as an agent that frees two services in the
same cycle would), and the whole in the lab with three hosts: two node
services and a spare. The lab's services are light programs (``app``), not
SlapOS nodes: what is tested is where the agents put them, which the
resources do not change (a SlapOS node is adopted and taken over in
tests/test_slapos_adopt.py)."""

import os
import textwrap
import threading

import pytest

from slaposha import placement
from slaposha.cluster.etcd import Client
from slaposha.cluster.keys import Keys
from slaposha.cluster.lease import HostLease, Ownership
from slaposha.config import ConfigError, load_cluster, load_services

from test_etcd_client import FAST_ELECTIONS, etcd_cluster, needs_etcd


def _files(tmp_path, services):
    (tmp_path / 'services').mkdir()
    (tmp_path / 'cluster.cfg').write_text(textwrap.dedent('''
        [cluster]
        name = c
        hosts = hA hB hS
        [host hA]
        address = 10.0.0.1
        [host hB]
        address = 10.0.0.2
        [host hS]
        address = 10.0.0.3
    '''))
    for name, text in services.items():
        (tmp_path / 'services' / (name + '.cfg')).write_text(
            textwrap.dedent(text))
    cluster = load_cluster(str(tmp_path / 'cluster.cfg'))
    return {c.name: c for c in load_services(cluster)}


NODE = '''
    [service]
    hosts = %s
    exclusive = node
    [slapos#node]
'''


def test_a_host_running_an_excluding_service_is_not_chosen(tmp_path):
    confs = _files(tmp_path, {'a': NODE % 'hA hS', 'b': NODE % 'hB hS',
                              'web': '[service]\n[app#x]\ncommand = true\n'})
    owners = {'a': 'hS', 'web': 'hB'}
    assert placement.blocking(confs, owners, confs['b'], 'hS') == \
        'hS runs a (exclusive = node)'
    assert placement.blocking(confs, owners, confs['b'], 'hB') is None
    # Services without a shared name do not keep each other away.
    assert placement.blocking(confs, owners, confs['web'], 'hS') is None
    assert placement.occupied(confs, {'b': 'hS'}, confs['a'], 'hS') == \
        ('b', 'node')
    assert placement.claims(Keys('/p', 'c'), confs['a'], 'hS') == \
        ['/p/c/exclusive/node/hS']


def test_services_whose_paths_collide_must_exclude_each_other(tmp_path):
    same = '''
        [service]
        hosts = %s
        [slapos#node]
    '''
    with pytest.raises(ConfigError) as e:
        _files(tmp_path, {'a': same % 'hA hS', 'b': same % 'hB hS'})
    assert str(e.value) == (
        '%s: [service] exclusive: a and b may both run on hS and both use'
        ' /etc/opt/slapos/slapos.cfg there: give them a common exclusive'
        ' name (e.g. exclusive = slapos-node) or different paths'
        % (tmp_path / 'services' / 'b.cfg'))


def test_services_on_different_hosts_need_no_exclusion(tmp_path):
    same = '''
        [service]
        hosts = %s
        [btrfs#data]
        volume = /srv/data
    '''
    confs = _files(tmp_path, {'a': same % 'hA', 'b': same % 'hB hS'})
    assert sorted(confs) == ['a', 'b']


@pytest.fixture(scope='module')
def client(tmp_path_factory):
    with etcd_cluster(tmp_path_factory.mktemp('etcd'), 1,
                      FAST_ELECTIONS) as members:
        c = Client([members[0].url], request_timeout=0.5,
                   retry_interval=0.2, timeout=2)
        yield c
        c.close()


@needs_etcd
def test_two_services_racing_for_one_host_never_both_get_it(
        client, tmp_path):
    """Two agents' worth of acquisitions at the same instant, each with its
    own lease, for two services of one exclusive name on host hS: exactly
    one wins every round, whatever the timing; the loser is told which
    service holds the host, and gets it once the winner releases it."""
    confs = _files(tmp_path, {'a': NODE % 'hA hS', 'b': NODE % 'hB hS'})
    k = Keys('/test-placement-%d' % os.getpid(), 'c')
    leases = [HostLease(client, 3, 1.0, 0.2, 0.5, 0.5) for _ in range(2)]
    for lease in leases:
        lease.grant()
    try:
        owns = [Ownership(client, k, name, 'hS',
                          placement.claims(k, confs[name], 'hS'))
                for name in ('a', 'b')]
        for _ in range(30):
            gate = threading.Barrier(2)
            tokens = [None, None]

            def take(i):
                gate.wait()
                tokens[i] = owns[i].acquire(leases[i].id)
            threads = [threading.Thread(target=take, args=(i,))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            winners = [i for i in range(2) if tokens[i]]
            assert len(winners) == 1, tokens
            loser = owns[1 - winners[0]]
            assert loser.holder is None
            assert loser.blocker.value == owns[winners[0]].service
            # The claim lives on the winner's lease, as its owner key.
            assert loser.blocker.lease == leases[winners[0]].id
            # Released in the owner key's transaction: the other gets it.
            assert owns[winners[0]].release()
            assert loser.acquire(leases[1 - winners[0]].id)
            assert loser.release()
    finally:
        for lease in leases:
            lease.revoke()


@needs_etcd
def test_a_claim_left_without_its_service_is_dropped(client, tmp_path):
    confs = _files(tmp_path, {'a': NODE % 'hA hS', 'b': NODE % 'hB hS'})
    k = Keys('/test-placement-stale-%d' % os.getpid(), 'c')
    lease = HostLease(client, 3, 1.0, 0.2, 0.5, 0.5)
    lease.grant()
    try:
        a = Ownership(client, k, 'a', 'hS', placement.claims(k, confs['a'],
                                                             'hS'))
        b = Ownership(client, k, 'b', 'hS', placement.claims(k, confs['b'],
                                                             'hS'))
        assert a.acquire(lease.id)
        # Something else than a's owner deletes its owner key: its claim
        # stays, and b is refused.
        client.delete(k.owner('a'))
        assert b.acquire(lease.id) is None and b.blocker.value == 'a'
        # While a runs here, the claim stands.
        assert placement.refusal(client, k, 'hS', b.blocker,
                                 lambda name: True, None) == \
            'hS runs a (exclusive = node)'
        line = placement.refusal(client, k, 'hS', b.blocker,
                                 lambda name: False, None)
        assert line == 'the claim of a on hS (exclusive = node) was left' \
            ' without its service: dropped'
        assert b.acquire(lease.id)
    finally:
        lease.revoke()


def _app(hosts, name, marker):
    return '''
        [service]
        hosts = %s
        exclusive = %s
        [app#main]
        command = exec sleep %s
    ''' % (hosts, name, marker)


@pytest.mark.lab
def test_n_node_hosts_and_a_spare(make_lab):
    """Nodes a (on hA) and b (on hB) may both fail over to the spare hS,
    which runs one of them at most. c and d, which both run only on hS and
    exclude each other, are free in the same cycle of hS's agent: the claim
    lets one start, never both."""
    from slaposha.lab import wait_for
    from slaposha.lab.cluster import LabCluster, Observer, marked_pids
    lab = make_lab(['hA', 'hB', 'hS'])
    base = 86400 + int(lab.id, 16)
    markers = {name: str(base + n) for n, name in enumerate('abcd')}
    lc = LabCluster(lab, ['hA', 'hB', 'hS'], services={
        'a': _app('hA hS', 'node', markers['a']),
        'b': _app('hB hS', 'node', markers['b']),
        'c': _app('hS', 'pair', markers['c']),
        'd': _app('hS', 'pair', markers['d'])})

    def where():
        """{service: [hosts running its program]}, seen from outside."""
        return {name: [h.name for h in lab if marked_pids(h, marker)]
                for name, marker in markers.items()}
    # Two nodes never run on one host, sampled every 20 ms throughout.
    observer = Observer(lab, probe=lambda h: len(
        [m for n, m in markers.items() if n in 'ab' and
         marked_pids(h, m)]) > 1).start()
    lc.start()
    try:
        wait_for(lambda: where()['a'] == ['hA'] and where()['b'] == ['hB']
                 and sorted(where()['c'] + where()['d']) == ['hS'], 30,
                 what='a on hA, b on hB, one of c and d on hS')
        first = 'c' if where()['c'] else 'd'
        other = 'd' if first == 'c' else 'c'
        status = lc.cli('hS', 'status').stdout
        assert '%s runs %s (exclusive = pair)' % ('hS', first) in status, \
            status
        assert lc.owner(other, 'hS') == (None, None)

        lab.crash('hA')
        wait_for(lambda: where()['a'] == ['hS'], 30, what='a on the spare')
        # The spare is taken: an operator cannot put b there either.
        refused = lc.cli('hB', 'switch', 'b', '--to', 'hS', check=False)
        assert refused.returncode == 2
        assert refused.stderr.strip() == \
            'slaposha: hS cannot run b: hS runs a (exclusive = node)'

        lab.restart('hA')
        lc.start_agent('hA')
        lc.wait_agent('hA')
        lab.crash('hB')

        def said():
            out = lc.cli('hS', 'status', check=False).stdout
            return 'no live host can run it: hS runs a (exclusive = node)' \
                in out and out
        tree = wait_for(said, 30, interval=0.5,
                        what='status saying that no host can take b')
        assert 'b          down     not running anywhere' in tree, tree
        assert where()['b'] == []
        # The operator moves a home: the spare takes b at once.
        lc.cli('hS', 'switch', 'a', '--to', 'hA', '--timeout', '60')
        wait_for(lambda: where()['b'] == ['hS'], 30, what='b on the spare')
        assert where()['a'] == ['hA']
        assert not observer.overlaps, observer.overlaps[:3]
        assert observer.samples > 100
    finally:
        observer.stop()
        for host in ('hA', 'hS'):
            lc.stop_agent(host)
        for host in ('hA', 'hB', 'hS'):
            print('---- agent log of %s\n%s' % (host, lc.log(host)[-3000:]))
