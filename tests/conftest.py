"""Shared fixtures: the lab, and the commands of this checkout."""

import os
import sys

import pytest

from slaposha.lab import Lab

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
EXAMPLES = os.path.join(TOP, 'examples')


def pytest_collection_modifyitems(config, items):
    # Lab tests need root; say so instead of failing on the first mount.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason='the lab needs root (namespaces, bridges,'
                            ' loop devices)')
    for item in items:
        if 'lab' in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_lab():
    """Start labs; every one is torn down after the test, pass or fail."""
    labs = []

    def make(hosts=('hA', 'hB', 'hW'), **kwargs):
        lab = Lab(list(hosts), **kwargs)
        labs.append(lab)
        return lab.start()
    try:
        yield make
    finally:
        for lab in labs:
            lab.teardown()


@pytest.fixture
def slaposha_cmd():
    """The slaposha command, run as a user would (a new process): the
    console script of the virtualenv when installed, else the module."""
    script = os.path.join(os.path.dirname(sys.executable), 'slaposha')
    if os.path.exists(script):
        return [script]
    return [sys.executable, '-m', 'slaposha.cli.main']
