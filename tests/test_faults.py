"""The short version of the randomized fault suite: a seeded sequence of
crashes, partitions, paused agents, killed etcd members and switches, with
the audits of slaposha.lab.faults after every step; any violation fails."""

import pytest

from slaposha.lab.faults import FaultSuite

pytestmark = pytest.mark.lab

ITERATIONS = 20
SEED = 20261126


def test_twenty_random_faults_without_a_violation(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    lines = []
    suite = FaultSuite(lab, SEED, say=lines.append)
    suite.start()
    try:
        for _ in range(ITERATIONS):
            suite.step()
    finally:
        suite.stop()
    report = suite.report()
    print('\n'.join(lines) + report)
    assert suite.iterations == ITERATIONS
    assert not any(suite.violations.values()), report
    assert sum(len(t) for t in suite.times.values()) > 0, report
