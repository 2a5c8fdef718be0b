"""The multi-host lab: reachability, faults, and a teardown that leaves
nothing behind, also after a failed or killed run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from slaposha.cgroup import cgroup2_mount
from slaposha.lab import RUN_ROOT, Lab, LabError, SLAPOS_PATHS, wait_for

from conftest import TOP

pytestmark = pytest.mark.lab


def leftovers(lab_id):
    """What of a lab still exists on the machine, by kind."""
    found = {}
    netns = subprocess.run(['ip', 'netns', 'list'], stdout=subprocess.PIPE,
                           universal_newlines=True).stdout
    found['netns'] = [line.split()[0] for line in netns.splitlines()
                      if line.startswith('sha-%s-' % lab_id)]
    found['links'] = [n for n in os.listdir('/sys/class/net')
                      if n.startswith('sha%s' % lab_id) or
                      n.startswith('shab%s' % lab_id)]
    with open('/proc/self/mountinfo') as f:
        found['mounts'] = [line.split()[4] for line in f
                           if 'slaposha-lab/%s' % lab_id in line]
    loops = subprocess.run(['losetup', '--noheadings', '--output',
                            'NAME,BACK-FILE'], stdout=subprocess.PIPE,
                           universal_newlines=True).stdout
    found['loops'] = [line for line in loops.splitlines()
                      if 'slaposha-lab/%s/' % lab_id in line]
    found['files'] = [p for p in ('%s/%s' % (RUN_ROOT, lab_id),
                                  '/var/tmp/slaposha-lab/%s' % lab_id)
                      if os.path.exists(p)]
    mount = cgroup2_mount()
    if mount and os.path.exists('%s/slaposha-lab/%s' % (mount, lab_id)):
        found['cgroups'] = ['%s/slaposha-lab/%s' % (mount, lab_id)]
    return {k: v for k, v in found.items() if v}


def test_hosts_reach_each_other_partition_and_heal(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    a, b, w = lab['hA'], lab['hB'], lab['hW']
    assert a.ping(b) and b.ping(w) and w.ping(a)
    assert a.ping(b.address6)
    lab.partition(['hA'])
    assert not a.ping(b) and not a.ping(w)
    assert b.ping(w)
    lab.heal()
    assert a.ping(b) and a.ping(w)
    # A majority/minority split: hA with the witness, hB alone.
    lab.partition(['hA', 'hW'], ['hB'])
    assert a.ping(w)
    assert not b.ping(a) and not b.ping(w)
    lab.heal()
    assert b.ping(a)


def test_no_route_out_of_the_lab(make_lab):
    lab = make_lab(['hA'])
    routes = lab['hA'].run(['ip', 'route', 'show', 'default']).stdout
    assert routes.strip() == ''
    routes6 = lab['hA'].run(['ip', '-6', 'route', 'show', 'default']).stdout
    assert routes6.strip() == ''
    # The root namespace has no address on the lab's segment.
    out = subprocess.run(['ip', '-o', 'addr', 'show', 'dev', lab.bridge],
                         stdout=subprocess.PIPE, universal_newlines=True)
    assert 'inet' not in out.stdout


def test_each_host_has_its_own_slapos_paths_and_hostname(make_lab):
    lab = make_lab(['hA', 'hB'])
    a, b = lab['hA'], lab['hB']
    for path in SLAPOS_PATHS:
        a.run(['sh', '-c', 'echo from-hA > %s/mark' % path])
        assert b.run(['cat', '%s/mark' % path], check=False).returncode != 0
        with open(a.path(path + '/mark')) as f:
            assert f.read() == 'from-hA\n'
        # The root namespace does not see it either.
        assert not os.path.exists(path + '/mark')
    assert a.run(['hostname']).stdout.strip() == 'hA'
    assert b.run(['hostname']).stdout.strip() == 'hB'


def test_crash_kills_every_process_and_cuts_the_link(make_lab):
    lab = make_lab(['hA', 'hB'])
    a, b = lab['hA'], lab['hB']
    b.spawn(['sleep', '300'], name='sleeper')
    # A daemon that left its parent, as supervisord does.
    b.run(['sh', '-c', 'setsid sleep 301 > /dev/null 2>&1 < /dev/null &'])
    wait_for(lambda: len(b.pids()) >= 2, 5, what='two processes in hB')
    survivor = a.spawn(['sleep', '302'], name='other')
    lab.crash('hB')
    assert b.pids() == []
    assert not a.ping(b)
    assert survivor.poll() is None, 'a crash of hB must not touch hA'
    lab.restart('hB')
    assert a.ping(b)


def test_restart_after_crash_forgets_runtime_state(make_lab):
    lab = make_lab(['hA', 'hB'])
    b = lab['hB']
    b.run(['mount', '-t', 'tmpfs', 'tmpfs', '/srv/slapgrid'])
    b.run(['ip', 'addr', 'add', '10.213.0.200/32', 'dev', 'lab0'])
    b.run(['touch', '/opt/slapgrid/on-disk'])
    lab.crash('hB')
    lab.restart('hB')
    mounts = b.run(['cat', '/proc/self/mounts']).stdout
    assert 'tmpfs /srv/slapgrid' not in mounts
    assert '10.213.0.200' not in b.run(['ip', 'addr']).stdout
    assert b.run(['ls', '/opt/slapgrid']).stdout.split() == ['on-disk']
    assert lab['hA'].ping(b)


def test_pause_and_resume(make_lab):
    lab = make_lab(['hA'])
    proc = lab['hA'].spawn(['sleep', '300'])

    def state():
        with open('/proc/%d/stat' % proc.pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    wait_for(lambda: state() in 'SR', 5, what='sleep running')
    lab.pause('hA')
    wait_for(lambda: state() == 'T', 5, what='stopped')
    lab.resume('hA')
    wait_for(lambda: state() in 'SR', 5, what='continued')


def test_teardown_leaves_nothing(make_lab):
    lab = make_lab(['hA', 'hB'])
    device = lab.add_disk('hA', '64M')
    subprocess.run(['mkfs.ext4', '-q', device], check=True) \
        if os.path.exists('/sbin/mkfs.ext4') else None
    lab['hA'].spawn(['sleep', '300'])
    lab.partition(['hA'])
    lab_id = lab.id
    assert leftovers(lab_id)
    lab.teardown()
    assert leftovers(lab_id) == {}
    lab.teardown()  # twice is harmless


def test_teardown_after_a_failure_inside_the_lab():
    lab_id = None
    with pytest.raises(ZeroDivisionError):
        with Lab(['hA', 'hB']) as lab:
            lab_id = lab.id
            lab['hB'].spawn(['sleep', '300'])
            lab.add_disk('hB', '32M')
            1 / 0
    assert leftovers(lab_id) == {}


KILLED_RUN = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, %r)
    from slaposha.lab import Lab
    lab = Lab(['hA', 'hB']).start()
    lab['hA'].spawn(['sleep', '300'])
    lab.add_disk('hB', '32M')
    lab.partition(['hA'])
    print(lab.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
''')


def test_a_killed_run_is_cleaned_by_the_next(make_lab):
    p = subprocess.run([sys.executable, '-c', KILLED_RUN % TOP],
                       stdout=subprocess.PIPE, universal_newlines=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL
    dead_id = p.stdout.strip()
    assert leftovers(dead_id), 'the killed run should have left its lab'
    lab = make_lab(['hA', 'hB'])
    assert leftovers(dead_id) == {}
    assert lab['hA'].ping(lab['hB'])


def test_sigterm_tears_the_lab_down():
    script = KILLED_RUN.replace(
        'os.kill(os.getpid(), signal.SIGKILL)',
        'import time\n'
        'try:\n'
        '    time.sleep(60)\n'
        'finally:\n'
        '    lab.teardown()')
    proc = subprocess.Popen([sys.executable, '-c', script % TOP],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        lab_id = proc.stdout.readline().strip()
        assert leftovers(lab_id)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(lab_id) == {}


def test_refuses_to_start_when_not_root(tmp_path):
    script = textwrap.dedent('''
        import os, sys
        sys.path.insert(0, %r)
        from slaposha.lab.__main__ import main
        os.setgid(65534); os.setuid(65534)
        sys.exit(main(['up', 'hA']))
    ''') % TOP
    p = subprocess.run([sys.executable, '-c', script], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=30, cwd=str(tmp_path))
    assert p.returncode == 1
    assert p.stderr == ('slaposha lab: the slaposha lab needs root (it creates'
                        ' network and mount namespaces, bridges and loop'
                        ' devices): run it as root\n')


def test_bad_partition_requests_are_refused(make_lab):
    lab = make_lab(['hA', 'hB'])
    with pytest.raises(LabError, match="no host 'hZ'"):
        lab.partition(['hZ'])
    with pytest.raises(LabError, match='two partition groups'):
        lab.partition(['hA'], ['hA', 'hB'])
    state = json.load(open(os.path.join(lab.rundir, 'state.json')))
    assert state['owner'][0] == os.getpid()


def test_demo_runs_and_leaves_nothing():
    p = subprocess.run([sys.executable, '-m', 'slaposha.demo'],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300, cwd=TOP)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'comp-lab   up       on hA' in p.stdout
    assert 'the partition answers again from hB' in p.stdout
    assert 'no buildout ran on hB: True' in p.stdout
    assert 'comp-lab   up       on hB' in p.stdout
    lab_id = p.stdout.split('lab ', 1)[1].split(':', 1)[0]
    assert leftovers(lab_id) == {}


def test_observer_counts_only_what_ran_at_one_instant(make_lab):
    """The safety tests' observer: two hosts running the service at once
    is an overlap; a hand-over that happens between its looks at two hosts
    (hA's process ended, then hB's started) is not."""
    from slaposha.lab.cluster import Observer, check_no_overlap
    lab = make_lab(['hA', 'hB'])
    marker = str(86400 + int(lab.id, 16))
    procs = []

    def run(host):
        proc = lab[host].spawn(['sleep', marker], name='marked')
        procs.append(proc)
        wait_for(lambda: Observer(lab, marker).running_on(lab[host]), 5,
                 what='the marked process on %s' % host)
        return proc

    try:
        # Both at once: counted.
        run('hA')
        run('hB')
        observer = Observer(lab, marker, hosts=['hA', 'hB']).start()
        wait_for(lambda: observer.samples > 3, 5, what='a few samples')
        observer.stop()
        assert observer.overlaps and observer.overlaps[0][1] == ['hA', 'hB']
        with pytest.raises(LabError, match='ran on hA and hB at once'):
            check_no_overlap(observer)
        for proc in procs:
            proc.kill()
            proc.wait()
        del procs[:]
        # One after the other, between the looks at hA and at hB.
        first = run('hA')
        observer = Observer(lab, marker, hosts=['hA', 'hB'])
        look, moved = observer._look, []

        def hand_over_after_looking_at_ha(host):
            found = look(host)
            if host.name == 'hA' and found and not moved:
                first.kill()
                first.wait()
                moved.append(run('hB'))
            return found

        observer._look = hand_over_after_looking_at_ha
        observer.start()
        wait_for(lambda: observer.samples > 5, 5, what='a few samples')
        observer.stop()
        assert observer.first.keys() == {'hA', 'hB'}
        assert observer.overlaps == []
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
