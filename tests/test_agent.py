"""The agent in the lab with real etcd and real processes: status from every
host, operator actions, failures of resources and what the agent refuses."""

import json
import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab import web as webservice
from slaposha.lab.cluster import (
    LabCluster, Observer, check_no_overlap, marked_pids)

pytestmark = pytest.mark.lab


def start_cluster(make_lab, services, hosts=('hA', 'hB', 'hC'),
                  witnesses=()):
    lab = make_lab(list(hosts) + list(witnesses))
    lc = LabCluster(lab, [h for h in hosts], list(witnesses),
                    services=services, settings='''
                    [agent]
                    monitor_interval = 0.5
                    failed_hold = 30
                    ''').start()
    return lab, lc


def status_of(lc, host, service=None):
    """The cluster status as ``host`` sees it (retried while its agent
    cannot read etcd, e.g. during an election)."""
    def read():
        answer = json.loads(lc.cli(host, 'status', '--json').stdout)
        return answer if 'services' in answer else None
    answer = wait_for(read, 10, interval=0.2, what='a cluster status')
    return answer['services'][service] if service else answer


def decision(svc, host):
    on = svc['on'].get(host) or {}
    return (on.get('decision') or [None, None, ''])[1:]


@pytest.fixture
def web(make_lab):
    lab = make_lab(['hA', 'hB', 'hC'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB', 'hC'], services={'web': '''
        [service]
        hosts = hA hB
        [app#main]
        command = exec sleep %s
    ''' % marker}).start()
    lc.observer = Observer(lab, marker).start()
    try:
        lc.observer.wait_running('hA', 30)
        yield lc
    finally:
        lc.observer.stop()
        for host in lc.hosts:
            lc.stop_agent(host)


def test_status_shows_the_same_tree_from_every_host(web):
    lc = web
    for host in ('hA', 'hB', 'hC'):
        svc = wait_for(lambda: (lambda s: s if s['resources'] else None)(
            status_of(lc, host, 'web')), 10, what='resources published')
        assert svc['owner'] == 'hA'
        assert svc['resources'] == [['app#main', 'up', '1 process(es)']]
        assert decision(svc, 'hA')[0] == 'start'
        assert 'preferred live host' in decision(svc, 'hA')[1]
        assert decision(svc, 'hB') in (['standby', 'hA owns it'],
                                       ['wait', 'left to hA: hA is the'
                                        ' preferred live host'])
        tree = lc.cli(host, 'status').stdout
        assert 'web        up       on hA' in tree
        assert 'app#main       up' in tree
        assert '(seen from %s)' % host in tree


def test_switch_moves_the_service_and_freeze_holds_it(web):
    lc = web
    out = lc.cli('hC', 'switch', 'web', '--to', 'hB').stdout
    assert 'web: runs on hB' in out
    assert lc.observer.where() == ['hB']
    assert lc.observer.last['hA'] < lc.observer.first['hB']
    svc = status_of(lc, 'hA', 'web')
    assert svc['switch'] is None
    assert 'switch: moving it to hB, as operator on hC' in lc.log('hA')
    assert 'an operator switched it to hB' in decision(svc, 'hB')[1]
    # Frozen: a crash of the owner moves nothing, and status says why.
    lc.cli('hA', 'freeze', 'web')
    lc.lab.crash('hB')
    time.sleep(6)
    assert lc.observer.where() == []
    svc = status_of(lc, 'hA', 'web')
    assert svc['frozen'] and svc['owner'] is None
    assert decision(svc, 'hA')[0] == 'frozen'
    assert 'FROZEN by operator on hA' in lc.cli('hA', 'status').stdout
    refused = lc.cli('hA', 'switch', 'web', '--to', 'hA', check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith('slaposha: web is frozen by operator')
    lc.cli('hA', 'thaw', 'web')
    lc.observer.wait_running('hA', 10)
    check_no_overlap(lc.observer)


def test_a_switch_to_a_crashed_host_is_abandoned_for_good(web):
    """A switch to a host that dies right after the request: the source
    stops once, the service is back on the source as soon as the target
    is known lost (its lease gone), the switch is recorded as abandoned
    with its reason and is never tried again: the service stays on the
    source when the target comes back (before, the source started and
    stopped it every ~6 s and it moved when the target returned)."""
    lc = web
    lc.lab.crash('hB')
    asked = time.monotonic()
    # hB's lease still runs: the request is accepted.
    p = lc.cli('hA', 'switch', 'web', '--to', 'hB', '--timeout', '60',
               check=False)
    assert p.returncode == 2, p.stdout
    assert p.stderr.count('\n') == 1, p.stderr
    assert 'web: the switch to hB was abandoned after' in p.stderr
    assert 'hB is not alive (no agent holds a lease there)' in p.stderr
    assert 'owned by hA' in p.stderr
    lc.observer.wait_running('hA', 10)
    wait_for(lambda: lc.observer.where() == ['hA'], 10, interval=0.1,
             what='web back on hA')
    back = time.monotonic() - asked
    svc = status_of(lc, 'hA', 'web')
    assert back < 120, 'not back long before the deadline (stop_timeout' \
        ' + start_timeout, 420 s by default)'
    print('web back on hA %.2f s after the switch to the crashed hB' % back)
    assert svc['switch'] is None and svc['operation'] is None
    assert svc['owner'] == 'hA'
    assert svc['abandoned']['to'] == 'hB'
    assert svc['abandoned']['reason'] == \
        'hB is not alive (no agent holds a lease there)'
    assert 'switch to hB abandoned at' in lc.cli('hA', 'status').stdout
    mon = lc.cli('hC', 'mon', '--once').stdout
    assert [line for line in mon.splitlines() if ' web ' in line and
            ' abandoned ' in line], mon
    assert 'abandon: the switch to hB asked by operator on hA' in \
        lc.log('hA')
    # hB comes back: nothing moves, nothing restarts on hA.
    first = lc.observer.first['hA']
    lc.lab.restart('hB')
    lc.start_agent('hB')
    lc.wait_agent('hB')
    for _ in range(16):
        time.sleep(0.5)
        assert lc.observer.where() == ['hA']
    assert 'hB' not in lc.observer.first
    assert lc.observer.first['hA'] == first
    assert lc.log('hA').count('switch: moving it to hB') == 1
    check_no_overlap(lc.observer)


def test_stop_start_and_takeover(web):
    lc = web
    assert 'stopped after' in lc.cli('hB', 'stop', 'web').stdout
    assert lc.observer.where() == []
    time.sleep(1)
    assert lc.observer.where() == [], 'the agents must leave it stopped'
    assert decision(status_of(lc, 'hA', 'web'), 'hA')[0] == 'stopped'
    assert 'runs on hB' in lc.cli('hC', 'start', 'web', '--on', 'hB').stdout
    assert 'runs on hA' in lc.cli('hA', 'takeover', 'web').stdout
    assert lc.observer.where() == ['hA']
    check_no_overlap(lc.observer)


def test_bad_operator_input_is_one_line(web):
    lc = web
    for args, expected in [
            (('switch', 'nope', '--to', 'hB'), "no service 'nope'"),
            (('switch', 'web', '--to', 'hC'), "web cannot run on 'hC'"),
            (('switch', 'web', '--to', 'hZ'), "web cannot run on 'hZ'"),
            (('status', 'nope'), "no service 'nope'")]:
        p = lc.cli('hA', *args, check=False)
        assert p.returncode == 2, args
        assert p.stderr.count('\n') == 1 and expected in p.stderr, p.stderr
        assert 'Traceback' not in p.stderr
    lc.stop_agent('hC')
    p = lc.cli('hC', 'status', check=False)
    assert p.returncode == 2
    assert 'no agent answers on /run/slaposha/agent.sock' in p.stderr
    assert lc.observer.where() == ['hA']


def test_hostile_values_in_etcd_stall_no_decision(web):
    """What another host or an operator writes in etcd is read within
    limits: a target nested 5000 deep and a switch to a list show as
    unreadable in status, and the agents still decide (a switch, while the
    target stays). Before, each was a RecursionError or a TypeError at
    every cycle of every agent: nothing was decided any more."""
    lc = web
    lc.query('hC', '''
        import time
        client.put(keys.service('web', 'target'), '[' * 5000 + ']' * 5000)
        client.put(keys.service('web', 'switch'), json.dumps(
            {'to': ['hB'], 'by': 'operator on hC', 'at': time.time()}))
        result = True
    ''')
    svc = wait_for(lambda: (lambda s: s if (s['target'] or {}).get(
        'unreadable') else None)(status_of(lc, 'hB', 'web')), 10,
        what='the unreadable target in status')
    assert svc['target'] == {'unreadable': 'target nests deeper than 32'
                             ' levels'}
    assert svc['switch'] == {'unreadable': 'switch: field to must be a'
                             ' string (got ["hB"])'}
    tree = lc.cli('hB', 'status').stdout
    assert '! switch: switch: field to must be a string' in tree
    assert 'web: runs on hB' in lc.cli('hC', 'switch', 'web', '--to',
                                       'hB').stdout
    assert lc.observer.where() == ['hB']
    check_no_overlap(lc.observer)


def test_failed_start_does_not_half_run_and_names_the_resource(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
        [service]
        hosts = hA hB
        [app#first]
        command = exec sleep %s
        [app#broken]
        start = echo no such thing >&2; exit 3
    ''' % marker}).start()
    observer = Observer(lab, marker).start()
    try:
        def failed_everywhere():
            svc = status_of(lc, 'hA', 'web')
            return all(decision(svc, h)[0] == 'failed' for h in ('hA', 'hB'))
        wait_for(failed_everywhere, 30, interval=0.3,
                 what='start failed on both hosts')
        svc = status_of(lc, 'hB', 'web')
        assert svc['owner'] is None
        for host in ('hA', 'hB'):
            action, reason = decision(svc, host)
            assert 'start failed at app#broken' in reason
            assert 'exited with code 3' in reason
        assert observer.where() == []
        # app#first started before app#broken failed, then was stopped:
        # never left running.
        assert observer.first, 'app#first should have started'
        time.sleep(1)
        assert observer.where() == []
        check_no_overlap(observer)
        status = status_of(lc, 'hA')
        assert status['hosts']['hA']['failed'] == ['web']
    finally:
        observer.stop()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_restart_in_place_then_on_failure_switch(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
        [service]
        hosts = hA hB
        restart = 1
        [app#main]
        command = exec sleep %s
    ''' % marker}, settings='''
        [agent]
        monitor_interval = 0.3
    ''').start()
    observer = Observer(lab, marker).start()
    try:
        observer.wait_running('hA', 30)
        wait_for(lambda: status_of(lc, 'hA', 'web')['resources'], 10,
                 what='web started and checked')

        def kill_on(host):
            import os
            import signal
            for pid in marked_pids(lab[host], marker):
                os.kill(pid, signal.SIGKILL)
        first = observer.first['hA']
        kill_on('hA')
        wait_for(lambda: 'restart 1 of 1' in lc.log('hA'), 10,
                 what='restart in place')
        wait_for(lambda: observer.running_on(lab['hA']), 10,
                 what='running again on hA')
        assert observer.where() == ['hA'] and observer.first['hA'] == first
        kill_on('hA')
        observer.wait_running('hB', 15)
        svc = status_of(lc, 'hB', 'web')
        assert svc['owner'] == 'hB'
        action, reason = decision(svc, 'hA')
        assert 'app#main is down' in lc.log('hA')
        assert 'on_failure = switch' in lc.log('hA')
        check_no_overlap(observer)
    finally:
        observer.stop()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_manual_service_waits_for_an_operator(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'db': '''
        [service]
        orchestrate = manual
        [app#main]
        command = exec sleep %s
    ''' % marker}).start()
    observer = Observer(lab, marker).start()
    try:
        wait_for(lambda: decision(status_of(lc, 'hA', 'db'), 'hA')[0]
                 == 'wait', 20, interval=0.3, what='a decision')
        time.sleep(1)
        assert observer.where() == []
        assert 'manual' in decision(status_of(lc, 'hA', 'db'), 'hA')[1]
        lc.cli('hB', 'start', 'db')
        assert observer.where() == ['hB']
        # Owner lost: a manual service is not taken over.
        lab.crash('hB')
        time.sleep(5)
        assert observer.where() == []
    finally:
        observer.stop()
        lc.stop_agent('hA')


def test_a_stop_that_fails_is_refused_and_shown(make_lab):
    """A resource that stays up after its stop failed keeps the service
    owned here: no other host may start it while it half-runs."""
    lab = make_lab(['hA', 'hB', 'hW'])
    flag = lab['hA'].path('/var/lib/slaposha') + '/stuck'
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
        [service]
        hosts = hA hB
        [app#stuck]
        start = touch /var/lib/slaposha/stuck
        check = test -e /var/lib/slaposha/stuck
        stop = echo cannot stop >&2; exit 1
    '''}).start()
    try:
        wait_for(lambda: status_of(lc, 'hA', 'web')['owner'] == 'hA', 30,
                 interval=0.3, what='web on hA')
        p = lc.cli('hA', 'switch', 'web', '--to', 'hB', '--timeout', '4',
                   check=False)
        assert p.returncode == 2
        svc = status_of(lc, 'hA', 'web')
        assert svc['owner'] == 'hA'
        action, reason = decision(svc, 'hA')
        assert action == 'refuse'
        assert 'stop failed at app#stuck' in reason or \
            'an earlier stop failed' in reason
        assert 'hB' not in [h for h, on in svc['on'].items()
                            if on and on['state'] == 'running']
        import os
        os.unlink(flag)
        lc.cli('hA', 'stop', 'web', '--timeout', '10', check=False)
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


VIP = webservice.VIP
fetch = webservice.fetch


@pytest.fixture
def web_ip(make_lab):
    """ip + fs (bind) + app on hA and hB; a witness; hO outside the
    cluster, as a client."""
    lab = make_lab(['hA', 'hB', 'hW', 'hO'])
    webservice.prepare(lab)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'],
                    services={'web': webservice.SERVICE}).start()
    from slaposha.lab.cluster import holds_address
    lc.observer = Observer(lab, probe=holds_address(VIP),
                           hosts=['hA', 'hB']).start()
    try:
        lc.observer.wait_running('hA', 30)
        wait_for(lambda: fetch(lab) == 'served by hA', 20,
                 what='web answering from hA')
        yield lc
    finally:
        lc.observer.stop()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_ip_fs_app_service_on_its_preferred_host(web_ip):
    lc = web_ip
    for host in ('hA', 'hB'):
        svc = wait_for(lambda: (lambda s: s if len(s['resources']) == 3
                                else None)(status_of(lc, host, 'web')), 10,
                       what='resources published')
        assert svc['owner'] == 'hA'
        assert [(rid, state) for rid, state, _ in svc['resources']] == [
            ('ip#vip', 'up'), ('fs#data', 'up'), ('app#http', 'up')]
    # The bind mount is hA's own: hB's mount point is empty.
    assert lc.lab['hB'].run(['ls', '/srv/slapgrid/web']).stdout == ''


def test_crash_moves_address_data_and_program(web_ip):
    lc = web_ip
    lc.lab.crash('hA')
    crashed = time.monotonic()
    wait_for(lambda: fetch(lc.lab) == 'served by hB', 20,
             what='web answering from hB')
    print('answered from hB %.2f s after the crash'
          % (time.monotonic() - crashed))
    check_no_overlap(lc.observer)


def test_switch_never_puts_the_address_on_both_hosts(web_ip):
    lc = web_ip
    out = lc.cli('hB', 'switch', 'web', '--to', 'hB').stdout
    assert 'runs on hB' in out
    wait_for(lambda: fetch(lc.lab) == 'served by hB', 10,
             what='web answering from hB')
    assert lc.observer.where() == ['hB']
    assert lc.observer.last['hA'] < lc.observer.first['hB']
    lc.cli('hA', 'switch', 'web', '--to', 'hA')
    wait_for(lambda: fetch(lc.lab) == 'served by hA', 10,
             what='web answering from hA again')
    check_no_overlap(lc.observer)
    assert lc.observer.samples > 50


def test_frozen_agent_address_is_dropped_by_its_watchdog(web_ip):
    """The watchdog drops the service's address too, not only its
    processes: hB adds it only after hA lost it."""
    import os
    import signal
    lc = web_ip
    agent = lc.agent_pid('hA')
    os.kill(agent, signal.SIGSTOP)
    try:
        wait_for(lambda: fetch(lc.lab) == 'served by hB', 20,
                 what='web answering from hB')
        assert lc.observer.last['hA'] < lc.observer.first['hB']
        check_no_overlap(lc.observer)
        assert 'dropped %s/32' % VIP in lc.log('hA')
    finally:
        os.kill(agent, signal.SIGCONT)


def test_on_failure_stop_and_freeze(make_lab):
    """on_failure = stop leaves the service stopped everywhere; on_failure =
    freeze leaves it where it is, frozen, for an operator to look at."""
    import os
    import signal
    lab = make_lab(['hA', 'hB', 'hW'])
    base = 86400 + int(lab.id, 16)
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={
        'stopper': '''
            [service]
            hosts = hA hB
            on_failure = stop
            [app#main]
            command = exec sleep %d
        ''' % base,
        'freezer': '''
            [service]
            hosts = hA hB
            on_failure = freeze
            [app#main]
            command = exec sleep %d
        ''' % (base + 1)}, settings='''
        [agent]
        monitor_interval = 0.3
    ''').start()
    stopper = Observer(lab, str(base)).start()
    freezer = Observer(lab, str(base + 1)).start()
    try:
        stopper.wait_running('hA', 30)
        freezer.wait_running('hA', 30)
        wait_for(lambda: all(status_of(lc, 'hA', s)['resources']
                             for s in ('stopper', 'freezer')), 10,
                 what='both started and checked')
        for pid in marked_pids(lab['hA'], str(base)):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (status_of(lc, 'hB', 'stopper')['target'] or {})
                 .get('state') == 'stopped', 10, what='stopper stopped')
        time.sleep(2)
        assert stopper.where() == []
        svc = status_of(lc, 'hB', 'stopper')
        assert svc['owner'] is None
        assert svc['target']['by'] == 'agent on hA'
        assert 'app#main is down' in svc['target']['reason']
        # The freezer is untouched by the other's failure; then it fails.
        assert freezer.where() == ['hA']
        for pid in marked_pids(lab['hA'], str(base + 1)):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: status_of(lc, 'hB', 'freezer')['frozen'], 10,
                 what='freezer frozen')
        time.sleep(2)
        svc = status_of(lc, 'hB', 'freezer')
        assert svc['owner'] == 'hA', 'a frozen service stays where it is'
        assert freezer.where() == []
        assert 'FROZEN by agent on hA' in lc.cli('hB', 'status').stdout
    finally:
        stopper.stop()
        freezer.stop()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
