"""Each service's start and stop runs in a worker of its own, beside the
agent's decision loop, within start_timeout / stop_timeout: a start that
hangs delays no other service, is undone at its deadline with nothing of
it left running, and a fence (the lease lost) cancels it for good."""

import time

import pytest

from slaposha.lab import wait_for
from slaposha.lab.cluster import (
    LabCluster, Observer, check_no_overlap, marked_pids)

from test_agent import decision, status_of

pytestmark = pytest.mark.lab


def test_a_hanging_start_delays_no_other_service(make_lab):
    """hB starts `slow`, whose start hangs (its command sleeps, with the
    app's own timeout of 600 s), when hA, the owner of `web`, crashes: hB
    takes web over in the usual time while slow's start still hangs (before,
    hB's loop was inside that start, and web waited for it); slow is undone
    at its start_timeout, nothing of it left, and status says why in one
    line."""
    lab = make_lab(['hA', 'hB', 'hW'])
    web = str(86400 + int(lab.id, 16))
    slow = str(2 * 86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
        [service]
        hosts = hA hB
        [app#main]
        command = exec sleep %s
    ''' % web, 'slow': '''
        [service]
        hosts = hB
        start_timeout = 20
        [app#hangs]
        start = sleep %s
        timeout = 600
    ''' % slow}, settings='''
        [agent]
        failed_hold = 120
    ''').start()
    observer = Observer(lab, web).start()
    hanging = Observer(lab, slow).start()
    try:
        observer.wait_running('hA', 30)
        hanging.wait_running('hB', 30)
        began = hanging.first['hB']
        assert time.monotonic() - began < 5, 'too late to crash hA'
        crashed = time.monotonic()
        lab.crash('hA')
        observer.wait_running('hB', 15)
        took = observer.first['hB'] - crashed
        print('web on hB %.2f s after hA crashed, slow still starting'
              ' there' % took)
        assert took < 10, took
        assert hanging.where() == ['hB'], 'slow should still be starting'
        svc = status_of(lc, 'hB', 'slow')
        assert svc['on']['hB']['state'] == 'starting'
        # Undone at its start_timeout: nothing of it left.
        wait_for(lambda: hanging.where() == [], 30, interval=0.1,
                 what='slow undone on hB')
        ran = hanging.last['hB'] - began
        print('slow undone %.2f s after its start began (start_timeout'
              ' 20 s)' % ran)
        assert 18 < ran < 25, ran
        why = 'start failed at app#hangs: did not start within' \
            ' start_timeout (20s): stopped again'
        wait_for(lambda: decision(status_of(lc, 'hB', 'slow'), 'hB')[0]
                 == 'failed', 10, interval=0.2, what='slow failed on hB')
        action, reason = decision(status_of(lc, 'hB', 'slow'), 'hB')
        assert reason.startswith(why), reason
        text = lc.cli('hB', 'status').stdout
        assert why in text, text
        # And in the history, beside the takeovers and switches.
        failed = wait_for(lambda: [e for e in lc.query('hB', '''
            from slaposha import history
            result = history.read(client, keys, 'slow')
        ''') if e['kind'] == 'failed'], 10, interval=0.5,
            what='the failed start in the history')
        assert failed[0]['to'] == 'hB'
        assert failed[0]['reason'].startswith(why), failed
        assert 19 < failed[0]['duration'] < 25, failed
        time.sleep(1)
        assert hanging.where() == [] and observer.where() == ['hB']
        assert not marked_pids(lab['hB'], slow)
        check_no_overlap(observer)
    finally:
        observer.stop()
        hanging.stop()
        lc.stop_agent('hB')


def test_a_lease_lost_during_a_start_leaves_nothing_running(make_lab):
    """hB's link is cut while its start of the service hangs: its lease
    runs out, the fence cancels the start (no later resource starts, the
    hanging command is killed) before hA may take the service over, and
    hB starts nothing of it again once back."""
    lab = make_lab(['hA', 'hB', 'hW'])
    hang = str(86400 + int(lab.id, 16))
    main = str(2 * 86400 + int(lab.id, 16))
    flag = lab['hB'].path('/var/lib/slaposha') + '/hang'
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'db': '''
        [service]
        hosts = hB hA
        [app#hangs]
        start = if [ -e /var/lib/slaposha/hang ]; then sleep %s; fi
        check = true
        timeout = 600
        [app#main]
        command = exec sleep %s
    ''' % (hang, main)}).start()
    import os

    def anything(host):  # any process of the service
        return bool(marked_pids(host, hang) or marked_pids(host, main))
    os.makedirs(os.path.dirname(flag), exist_ok=True)
    open(flag, 'w').close()
    observer = Observer(lab, probe=anything).start()
    try:
        wait_for(lambda: marked_pids(lab['hB'], hang), 30, interval=0.05,
                 what='the start hanging on hB')
        cut = time.monotonic()
        lab.partition(['hB'])
        # Fenced at its deadline (ttl - fence_margin after its last
        # renewal), before its lease may end in etcd.
        wait_for(lambda: not anything(lab['hB']), 5, interval=0.02,
                 what='nothing of db on hB')
        fenced = time.monotonic() - cut
        print('db fenced on hB %.2f s after the cut' % fenced)
        assert fenced < 3.0, fenced
        wait_for(lambda: marked_pids(lab['hA'], main), 20, interval=0.05,
                 what='db on hA')
        lab.heal('hB')
        lc.wait_agent('hB')
        for _ in range(10):
            time.sleep(0.5)
            assert observer.where() == ['hA'], '\n'.join(
                lc.log('hA').splitlines()[-30:] + ['-----'] +
                lc.log('hB').splitlines()[-40:])
        log = lc.log('hB')
        assert 'start cancelled' in log or 'lease lost' in log, log
        assert 'hB' not in [h for h, on in status_of(
            lc, 'hB', 'db')['on'].items() if on and on['state'] == 'running']
        check_no_overlap(observer)
    finally:
        observer.stop()
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_a_start_that_outlives_its_fence_keeps_the_service_here(make_lab):
    """A start whose process escapes the fence (its command moves itself
    out of the service's cgroup, so the kill misses it) and goes on after
    start_timeout: hB keeps the owner key, the service 'stop failed' there
    and status names the resource, so hA never starts it beside that
    process; once the process ends, hB releases the key and hA takes it."""
    lab = make_lab(['hA', 'hB', 'hW'])
    stray = str(86400 + int(lab.id, 16))
    main = str(2 * 86400 + int(lab.id, 16))
    flag = lab['hB'].path('/var/lib/slaposha') + '/escape'
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'db': '''
        [service]
        hosts = hB hA
        start_timeout = 3
        [app#escape]
        start = if [ -e /var/lib/slaposha/escape ]; then
            cg=$(sed -n 's/^0:://p' /proc/self/cgroup);
            m=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts);
            echo $$ > "$m$(dirname $(dirname $(dirname $cg)))/cgroup.procs";
            sleep %s; fi
        check = true
        timeout = 600
        [app#main]
        command = exec sleep %s
    ''' % (stray, main)}, settings='''
        [agent]
        failed_hold = 120
    ''').start()
    import os
    import signal
    os.makedirs(os.path.dirname(flag), exist_ok=True)
    open(flag, 'w').close()
    try:
        wait_for(lambda: marked_pids(lab['hB'], stray), 30, interval=0.05,
                 what='the escaped start on hB')
        reason = wait_for(lambda: (lambda d: d[1] if d[0] == 'refuse'
                                   else None)(decision(status_of(
                                       lc, 'hB', 'db'), 'hB')), 20,
                          interval=0.3, what='hB refusing to release db')
        assert 'app#escape, fenced, still goes on: not releasing it' in \
            reason, reason
        svc = status_of(lc, 'hA', 'db')
        assert svc['owner'] == 'hB'
        assert svc['on']['hB']['state'] == 'stop failed'
        for _ in range(6):
            time.sleep(0.5)
            assert lc.owner('db', 'hA')[0] == 'hB'
            assert not marked_pids(lab['hA'], main)
        for pid in marked_pids(lab['hB'], stray):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: marked_pids(lab['hA'], main), 30, interval=0.1,
                 what='db on hA once the stray start ended')
        assert not marked_pids(lab['hB'], main)
    finally:
        for pid in marked_pids(lab['hB'], stray):
            os.kill(pid, signal.SIGKILL)
        for host in ('hA', 'hB'):
            lc.stop_agent(host)


def test_an_operator_stop_cancels_a_hanging_start(make_lab):
    """`slaposha stop` while the service's start hangs: the start is
    cancelled at once, not left to its start_timeout, nothing of it is
    left, the owner key is given back and on_failure does not apply."""
    lab = make_lab(['hA', 'hB', 'hW'])
    hang = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'db': '''
        [service]
        hosts = hA hB
        start_timeout = 120
        [app#hangs]
        start = sleep %s
        timeout = 600
    ''' % hang}).start()
    try:
        wait_for(lambda: marked_pids(lab['hA'], hang), 30, interval=0.05,
                 what='the start hanging on hA')
        began = time.monotonic()
        lc.cli('hA', 'stop', 'db', '--timeout', '20')
        took = time.monotonic() - began
        print('stopped %.2f s after the request, its start hanging' % took)
        assert took < 10, took
        assert not marked_pids(lab['hA'], hang)
        svc = status_of(lc, 'hB', 'db')
        assert svc['owner'] is None
        assert svc['on']['hA']['state'] == 'stopped'
        log = lc.log('hA')
        assert 'stop: stopped by operator on hA' in log and \
            'its start is cancelled' in log, log
        assert 'on_failure' not in log
        time.sleep(2)
        assert not marked_pids(lab['hA'], hang)
        assert not marked_pids(lab['hB'], hang)
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
