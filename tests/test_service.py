"""A service's start never half-runs: whatever a driver raises, the
resources started before it are stopped again and the error names it."""

import os
import tempfile
import textwrap
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
