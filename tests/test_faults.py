"""The short version of the randomized fault suite: a seeded sequence of
crashes, partitions (one host, and a minority of two hosts against three),
paused agents, killed etcd members and switches, against a service whose
btrfs data is replicated while a writer appends acknowledged records, with
the audits of slaposha.lab.faults after every step; any violation fails."""

import pytest

from slaposha.lab.faults import FAULTS, LAB_HOSTS, LAB_PATHS, FaultSuite

pytestmark = pytest.mark.lab

ITERATIONS = 3 * len(FAULTS)  # three rounds of the deck: each fault 3 times
SEED = 20261126


def test_random_faults_without_a_violation(make_lab):
    lab = make_lab(LAB_HOSTS, paths=LAB_PATHS)
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
    assert set(suite.injected) == set(FAULTS), report
    # Takeovers happened and the data of each was audited.
    assert sum(len(t) for t in suite.times.values()) > 0, report
    assert sum(len(n) for n in suite.lost.values()) >= \
        sum(len(t) for t in suite.times.values()), report
