"""The owner's link cut for a moment (issue 15): a cut shorter than the
lease TTL minus what a renewal needs costs nothing (the renewals go through
as soon as the link is back), and a cut longer than the TTL still moves the
service, the old owner fencing itself before the new one starts. Two hosts
and a witness in the lab, real etcd members and agents, the default lease
profile (TTL 3 s, renewals every 0.5 s, fence margin 0.5 s)."""

import re
import time

import pytest

from slaposha.lab.cluster import (
    LabCluster, Observer, check_no_overlap, marked_pids)

pytestmark = pytest.mark.lab

TTL, RENEW, MARGIN = 3, 0.5, 0.5
# The longest cut the owner rides out whatever the moment it falls at: its
# last renewal may have been sent RENEW before the cut, and the renewal
# after it needs a few tenths of a second.
SHORT_CUT = TTL - MARGIN - RENEW - 0.3


@pytest.fixture
def web(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
        [service]
        hosts = hA hB
        [app#main]
        command = exec sleep %s
    ''' % marker}).start()
    lc.marker = marker
    lc.observer = Observer(lab, marker, hosts=('hA', 'hB')).start()
    try:
        lc.observer.wait_running('hA', 60)
        yield lc
    finally:
        lc.observer.stop()
        lab.heal()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def lost_leases(lc, host):
    return re.findall(r'lease [0-9a-f]+ lost: .*', lc.log(host))


def test_short_cuts_of_the_owner_link_cost_nothing(web):
    lc, lab = web, web.lab
    owner, token = lc.wait_owner('web', 'hW')
    assert owner == 'hA'
    time.sleep(2)
    pids = marked_pids(lab['hA'], lc.marker)
    assert pids
    # Cuts at different moments of the renewal period.
    for shift in (0.0, 0.3, 0.6, 0.9):
        time.sleep(3 + shift)
        lab.partition(['hA'])   # layer 2: ends at once, as links do
        time.sleep(SHORT_CUT)
        lab.heal('hA')
    time.sleep(TTL)
    assert lc.owner('web', 'hW') == ('hA', token), 'the service moved'
    assert marked_pids(lab['hA'], lc.marker) == pids, 'it was restarted'
    assert not lost_leases(lc, 'hA')
    assert 'hB' not in lc.observer.first
    # The renewals failed during the cuts and recovered after them.
    assert 'renewed again after' in lc.log('hA')


def test_a_cut_longer_than_the_ttl_moves_the_service_fenced_first(web):
    lc, lab = web, web.lab
    owner, token = lc.wait_owner('web', 'hW')
    assert owner == 'hA'
    time.sleep(2)
    lab.partition(['hA'])
    cut = time.monotonic()
    try:
        lc.observer.wait_running('hB', 30)
        moved = time.monotonic() - cut
        # Fenced at its own deadline, before the lease is gone in etcd.
        assert not marked_pids(lab['hA'], lc.marker)
        assert lc.observer.last['hA'] < lc.observer.first['hB']
        assert lc.observer.last['hA'] - cut < TTL - MARGIN + 0.5
        assert moved >= TTL - MARGIN - RENEW
    finally:
        lab.heal('hA')
    host, new_token = lc.wait_owner('web', 'hW', not_host='hA')
    assert host == 'hB' and new_token > token
    assert lost_leases(lc, 'hA')
    time.sleep(TTL)
    # Back on the link, the old owner never runs the service again.
    assert not marked_pids(lab['hA'], lc.marker)
    check_no_overlap(lc.observer)
