"""One broken service file degrades its host; it does not keep the agent
down. The agents start with the services that load, run them, and say
what they cannot run, where, in the first line of the status (before,
one bad file made every agent of the cluster refuse to start)."""

import json
import os

import pytest

from slaposha.lab.cluster import LabCluster

pytestmark = pytest.mark.lab

WEB = '[app#main]\ncommand = sleep 1d\n'


def test_a_broken_service_file_leaves_the_others_running(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': WEB})
    # A typo in a second service file, on every host.
    with open(os.path.join(lc.config_dir, 'services', 'db.cfg'), 'w') as f:
        f.write('[app#main]\ncommand = sleep 1d\nrestart = often\n')
    lc.start()
    try:
        assert lc.wait_owner('web', 'hW')[0] in ('hA', 'hB')
        first = lc.cli('hB', 'status').stdout.splitlines()[0]
        assert 'hB does not run db: %s' % os.path.join(
            lc.config_dir, 'services', 'db.cfg') in first, first
        assert '[app#main] restart' in first, first
        local = json.loads(lc.cli('hA', 'status', '--json').stdout)
        assert list(local['local']['broken']) == ['db']
        # Neither host is eligible for it, and says why.
        hosts = local['hosts']
        assert hosts['hB']['ineligible']['db'].startswith(
            'its service file does not load here: ')
        assert 'service db is not run here' in lc.log('hA')
        # config check still refuses the file, in one line.
        check = lc.cli('hA', 'config', 'check', check=False)
        assert check.returncode == 2
        assert check.stderr.count('\n') == 1 and 'db.cfg' in check.stderr
    finally:
        for host in ('hA', 'hB'):
            lc.stop_agent(host)
