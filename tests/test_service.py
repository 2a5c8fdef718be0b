"""A service's start never half-runs: whatever a driver raises, the
resources started before it are stopped again and the error names it."""

import os
import threading
import tempfile
import textwrap
import time
import uuid

import pytest

from slaposha import config
from slaposha.cgroup import Cgroup, cgroup2_mount, own_cgroup
from slaposha.resources import driver
from slaposha.service import Service, ServiceError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or cgroup2_mount() is None,
    reason='needs root and the cgroup v2 hierarchy')


def test_an_unexpected_driver_error_stops_what_was_started(monkeypatch):
    folder = tempfile.mkdtemp(prefix='slaposha-test-')
    path = os.path.join(folder, 'svc.cfg')
    with open(path, 'w') as f:
        f.write(textwrap.dedent('''
            [service]
            hosts = hA
            [app#first]
            command = exec sleep 600
            [task#second]
            command = true
            schedule = 1h
        '''))
    conf = config.load_service(path)
    root = Cgroup(os.path.join(own_cgroup(), 'slaposha-test-%s'
                               % uuid.uuid4().hex[:8]))
    root.create()
    service = Service(conf, root, folder)

    def broken(self):
        raise ValueError('a bug in the driver')
    monkeypatch.setattr(driver('task'), 'start', broken)
    try:
        with pytest.raises(ServiceError) as failed:
            service.start()
        assert failed.value.rid == 'task#second'
        assert str(failed.value) == 'ValueError: a bug in the driver'
        first = service.resources[0]
        assert first.status().state == 'down'
        assert not service.cgroup.exists() or not service.cgroup.pids()
    finally:
        service.fence()
        service.cgroup.remove()
        root.remove()


class _Data(object):
    """A data resource as the agent sees it on a standby."""

    def __init__(self, lag, live=False):
        self.rid = 'btrfs#data'
        self._lag = lag
        self.path = '/srv/slapgrid'
        self.live = live

    def lag(self):
        return self._lag

    def exists(self):
        return self.live


def _problems(res, owner_alive, max_lag=None, slot=None):
    from types import SimpleNamespace
    from slaposha.agent import Agent
    slot = slot or SimpleNamespace(conf=SimpleNamespace(max_lag=max_lag),
                                   lags={}, owner_had_data=False)
    slot.service = SimpleNamespace(data=lambda: [res])
    return Agent._data_problems(None, slot, owner_alive), slot


def test_a_standby_without_any_copy_never_takes_over_by_itself():
    # A brand-new service: no owner ever seen, no data anywhere: it may
    # start (the first owner creates the volume).
    assert _problems(_Data((None, None)), owner_alive=False)[0] == []
    # An owner runs it with data, this host has no copy yet: not eligible,
    # and still not once the owner is gone.
    problems, slot = _problems(_Data((None, None)), owner_alive=True)
    assert problems == ['btrfs#data: no copy of /srv/slapgrid here yet;'
                        ' `slaposha takeover --force` overrides']
    assert _problems(_Data((None, None)), False, slot=slot)[0] == problems
    # The old owner back with its live volume, or a standby with a copy.
    assert _problems(_Data((None, None), live=True), False,
                     slot=slot)[0] == []
    assert _problems(_Data((1.5, '000004-3')), True)[0] == []
    # max_lag: a copy too old.
    assert 'data too stale' in _problems(_Data((12.0, '000004-3')), True,
                                         max_lag=10.0)[0][0]


def _service(body):
    folder = tempfile.mkdtemp(prefix='slaposha-test-')
    path = os.path.join(folder, 'svc.cfg')
    with open(path, 'w') as f:
        f.write(textwrap.dedent(body))
    conf = config.load_service(path)
    root = Cgroup(os.path.join(own_cgroup(), 'slaposha-test-%s'
                               % uuid.uuid4().hex[:8]))
    root.create()
    return Service(conf, root, folder), root


def _check_overrun(service, root, call, message):
    """``call()`` fails on app#hangs with ``message`` well before the app's
    own 60 s timeout, and leaves nothing running."""
    try:
        began = time.monotonic()
        with pytest.raises(ServiceError) as failed:
            call()
        took = time.monotonic() - began
        assert failed.value.rid == 'app#hangs'
        assert str(failed.value) == message
        assert took < 10, took
        assert [st.state for rid, st in service.status()] == ['down'] * 2
        assert not service.cgroup.exists() or not service.cgroup.pids()
    finally:
        service.fence()
        service.cgroup.remove()
        root.remove()


def test_a_start_that_overruns_start_timeout_is_undone():
    """start_timeout bounds the whole start: a resource still starting
    then is fenced and what started before it is stopped again (before,
    nothing bounded it: here the app's own 60 s timeout)."""
    service, root = _service('''
        [service]
        hosts = hA
        start_timeout = 1
        [app#first]
        command = exec sleep 600
        [app#hangs]
        start = exec sleep 600
        timeout = 60
    ''')
    _check_overrun(service, root, lambda: service.start(
        timeout=service.conf.service.start_timeout),
        'did not start within start_timeout (1s): stopped again')


def test_a_stop_that_overruns_stop_timeout_is_fenced_and_said():
    """stop_timeout bounds the whole stop: a resource still stopping then
    is fenced, the ones after it too, and ServiceError says so (the agent
    then checks that they are down before it lets the service go)."""
    service, root = _service('''
        [service]
        hosts = hA
        stop_timeout = 1
        [app#first]
        command = exec sleep 600
        [app#hangs]
        command = exec sleep 600
        stop = exec sleep 600
        timeout = 60
    ''')
    service.start()
    _check_overrun(service, root, lambda: service.stop(
        timeout=service.conf.service.stop_timeout),
        'did not stop within stop_timeout (1s): fenced')


def _marker():
    """A sleep's duration that no other process of the machine has."""
    return str(86400 + int(uuid.uuid4().hex[:6], 16))


def _alive(service, marker):
    """Processes of the service's cgroup whose command line has
    ``marker``."""
    found = []
    for pid in (service.cgroup.pids() if service.cgroup.exists() else []):
        try:
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_a_fence_during_a_start_cancels_it_for_good():
    """The lease lost while a service starts (the agent's lease thread
    fences it, here from another thread): the resource starting is killed,
    the ones after it never start, and nothing is left running once
    start() returned."""
    marker = _marker()
    ready = os.path.join(tempfile.mkdtemp(prefix='slaposha-test-'), 'ready')
    service, root = _service('''
        [service]
        hosts = hA
        [app#first]
        command = exec sleep %s
        [app#slow]
        start = [ -e %s ] || sleep %s
        [app#after]
        command = exec sleep %s
    ''' % (marker, ready, marker, marker))
    try:
        threading.Timer(1.0, service.fence).start()
        began = time.monotonic()
        with pytest.raises(ServiceError) as failed:
            service.start()
        assert time.monotonic() - began < 5
        assert failed.value.rid == 'app#slow', str(failed.value)
        assert str(failed.value).startswith(
            'start cancelled at app#slow: the service was fenced')
        assert _alive(service, marker) == []
        assert not os.path.exists(service.resources[2].log_path())
        # Started again, all of it runs: the fence was for that start.
        open(ready, 'w').close()
        service.start()
        assert [st.state for rid, st in service.status()] == [
            'up', 'down', 'up']   # app#slow's start leaves no process
    finally:
        service.fence()
        service.cgroup.remove()
        root.remove()


def test_a_start_that_overruns_never_launches_after_its_fence(monkeypatch):
    """A driver's start that goes on in its thread after the fence (as
    the slapos driver's loop that launches supervisord again after a
    refusal) launches nothing more: before, its process ran on after the
    start was undone and the owner key released."""
    marker = _marker()
    service, root = _service('''
        [service]
        hosts = hA
        start_timeout = 1
        [app#stubborn]
        start = true
    ''')
    app = driver('app')
    launched = []

    def stubborn(self):
        self.cgroup.create()
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                launched.append(self.launch(self._argv(
                    'exec sleep %s' % marker)))
            except Exception as e:  # the driver's own retry, as slapos'
                launched.append(e)
            time.sleep(0.2)
    monkeypatch.setattr(app, 'start', stubborn)
    fenced, seen, done = [], [], threading.Event()
    cancel = service.cancel.set
    service.cancel.set = lambda: (fenced.append(time.monotonic()),
                                  cancel())

    def watch():  # what runs after the fence, while start() goes on
        while not done.is_set():
            if fenced and time.monotonic() > fenced[0] + 0.3:
                seen.extend(_alive(service, marker))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(ServiceError) as failed:
            service.start(timeout=service.conf.service.start_timeout)
        done.set()
        watcher.join()
        assert str(failed.value) == \
            'did not start within start_timeout (1s): stopped again'
        assert seen == []
        ended = time.monotonic()
        while time.monotonic() < ended + 3:
            assert _alive(service, marker) == []
            time.sleep(0.1)
        refused = [e for e in launched if isinstance(e, Exception)]
        assert refused and 'start cancelled' in str(refused[0])
        assert service.busy() is None
    finally:
        done.set()
        service.fence()
        service.cgroup.remove()
        root.remove()
