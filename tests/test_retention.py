"""Snapshots kept as backups (hourly, daily, weekly): the policy alone, the
``btrfs`` keys, and a simulated week in the lab with a takeover and a
fail-back, on real btrfs file systems, with a clock the test moves."""

import datetime
import textwrap

import pytest

from slaposha import config
from slaposha.config import ConfigError
from slaposha.replication.__main__ import main as replication_main
from slaposha.lab.replication import (
    LAB_PATHS, PORT, SNAPDIR, VOL, ReplicationLab, remove_mount_point)
from slaposha.replication.retention import Clock, Retention

lab = pytest.mark.lab

UTC = datetime.timezone.utc
# A Monday, 00:10 UTC.
MONDAY = datetime.datetime(2026, 11, 23, 0, 10, tzinfo=UTC).timestamp()


def expected(created, minutely, hourly, daily, weekly):
    """What the policy keeps, worked out with calendar dates: the first
    snapshot of each of the newest N minutes, hours, days and ISO weeks
    that have one."""
    def step(key, count):
        first = {}
        for name, when in sorted(created.items(), key=lambda kv: kv[1]):
            first.setdefault(key(datetime.datetime.fromtimestamp(when, UTC)),
                             name)
        return set(first[k] for k in sorted(first)[-count:]) if count \
            else set()
    return (step(lambda d: (d.date(), d.hour, d.minute), minutely) |
            step(lambda d: (d.date(), d.hour), hourly) |
            step(lambda d: d.date(), daily) |
            step(lambda d: d.isocalendar()[:2], weekly))


def test_the_policy_keeps_the_first_of_each_period():
    # Every 25 seconds for 2 days, then every 25 minutes for 20 days:
    # minutes and hours with one or more snapshots, weeks cut at Monday
    # 00:00 UTC.
    created = {'%06d-1' % i: MONDAY + 3 * 86400 + i * 25
               for i in range(2 * 86400 // 25)}
    last = max(created.values())
    created.update({'%06d-2' % i: last + i * 1500
                    for i in range(1, 20 * 24 * 60 // 25)})
    for counts in ((10, 24, 7, 4), (0, 3, 0, 0), (0, 0, 2, 0), (0, 0, 0, 5),
                   (0, 0, 0, 0), (1000, 1000, 1000, 1000), (7, 0, 0, 0)):
        kept = Retention(*counts).keepers(list(created), created.get)
        assert set(kept) == expected(created, *counts), counts
    kept = Retention(0, 2, 1, 1).keepers(list(created), created.get)
    newest_day = max(created.values()) // 86400 * 86400
    first_today = min(n for n, t in created.items() if t >= newest_day)
    assert 'daily' in kept[first_today]
    # The week began on Monday: the first snapshot of the newest week is
    # the first at or after the newest Monday 00:00.
    monday = MONDAY - 600 + 3 * 7 * 86400
    first_week = min(n for n, t in created.items() if t >= monday)
    assert kept[first_week] == ['weekly']


def test_a_snapshot_of_unknown_time_is_not_kept_by_the_policy():
    created = {'000001-1': None, '000002-1': MONDAY, '000003-1': 'soon'}
    assert Retention(10, 24, 7, 4).keepers(list(created), created.get) == \
        {'000002-1': ['minutely', 'hourly', 'daily', 'weekly']}


def test_off_and_bad_counts():
    assert not Retention(0, 0, 0, 0)
    assert str(Retention()) == 'minutely 10, hourly 24, daily 7, weekly 4'
    with pytest.raises(ValueError, match='daily: expected 0 or more'):
        Retention(1, 1, -1, 1)


def test_clock_moves_only_when_told():
    clock = Clock(100)
    assert clock() == 100 and clock.advance(3600) == 3700 and clock() == 3700


def load(tmp_path, text):
    path = tmp_path / 'svc.cfg'
    path.write_text(textwrap.dedent(text))
    return config.load_service(str(path))


def test_btrfs_keys_and_defaults(tmp_path):
    section, = load(tmp_path, '''\
        [btrfs#data]
        volume = /srv/slapgrid
        ''').resources
    assert (section.minutely, section.hourly, section.daily,
            section.weekly) == (10, 24, 7, 4)
    section, = load(tmp_path, '''\
        [btrfs#data]
        volume = /srv/slapgrid
        hourly = 0
        weekly = 12
        ''').resources
    assert (section.minutely, section.hourly, section.daily,
            section.weekly) == (10, 0, 7, 12)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, '''\
            [btrfs#data]
            volume = /srv/slapgrid
            daily = -2
            ''')
    assert 'daily' in str(e.value) and '\n' not in str(e.value)


def test_receiver_retention_argument_is_one_line(capsys):
    with pytest.raises(SystemExit):
        replication_main(['receiver', '--host', 'h', '--listen', '::1',
                          '--ssl-dir', '/nonexistent', '--retention', '24,7,4'])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'expected MINUTELY,HOURLY,DAILY,WEEKLY' in err


# -- the lab: a simulated week, a takeover and a fail-back --------------------

# One owner's turn inside a host: a snapshot every ``step`` seconds of the
# moved clock, each sent to the other host, then pruned as the driver does.
# Each cycle writes its number into the volume first.
OWNER_TURN = '''
    from slaposha.replication.sender import Sender
    from slaposha.replication.volume import Volume
    from slaposha.replication.retention import Clock, Retention
    volume = Volume(%(vol)r)
    volume.clock = Clock(%(start)r)
    volume.retention = Retention(10, 24, 7, 4)
    sender = Sender(volume, %(token)d, [(%(peer)r, %(address)r, %(port)d)],
                    %(tls)r, %(host)r, keep=3)
    result = []
    for i in range(%(cycles)d):
        with open(%(vol)r + '/cycle', 'w') as f:
            f.write('%%s %%d' %% (%(host)r, %(first)d + i))
        cycle = sender.cycle()
        sent = cycle.results.get(%(peer)r)
        result.append([cycle.snapshot.name, volume.clock(),
                       sent and sent.parent,
                       {str(k): str(e) for k, e in cycle.errors.items()}])
        volume.clock.advance(%(step)r)
'''


@pytest.fixture(scope='module', autouse=True)
def mount_point():
    yield
    remove_mount_point()


@lab
def test_retention_keeps_what_the_policy_says_over_a_week(make_lab):
    pair = ReplicationLab(make_lab(['hA', 'hB'], paths=LAB_PATHS))
    try:
        for name in ('hA', 'hB'):
            pair.receiver(name, retention='10,24,7,4')
        step = 50 * 60.0
        created, first_parents = {}, []
        # hA owns for 4 days, hB takes over for 2, hA gets it back for 2.
        turns = [('hA', 10, 4), ('hB', 20, 2), ('hA', 30, 2)]
        clock, count = MONDAY, 0
        for host, token, days in turns:
            if count:
                pair.promote(host)
            cycles = int(days * 86400 // step)
            peer = pair.other(host)
            taken = pair.py(host, OWNER_TURN % {
                'vol': VOL, 'start': clock, 'token': token, 'peer': peer,
                'address': pair[peer].address, 'port': PORT,
                'tls': pair.tls(host), 'host': host, 'cycles': cycles,
                'first': count, 'step': step}, timeout=900)
            assert [errors for _, _, _, errors in taken if errors] == []
            first_parents.append(taken[0][2])
            for name, when, _, _ in taken:
                created[name] = when
            clock, count = clock + cycles * step, count + cycles
        # The chain never broke: after the takeover and the fail-back, the
        # first copy was incremental all the same.
        assert first_parents[0] is None
        assert None not in first_parents[1:]
        policy = expected(created, 10, 24, 7, 4)
        # 24 hours (of which the newest 10 minutes that have one), 7 days
        # (the oldest of them shares its first snapshot with its week), the
        # 2 weeks the 8 days span.
        assert len(policy) >= 24 + 7
        newest = sorted(created, key=lambda n: created[n])
        for host in ('hA', 'hB'):
            status = pair.status(host)
            held = set(status['snapshots'])
            others = set(newest[-3:]) | set(status['peers'].values()) | \
                set([status['live']] if status['live'] else [])
            # Every snapshot the policy names is there, and nothing else
            # but what replication keeps for itself.
            assert policy <= held, (host, sorted(policy - held))
            assert held - policy <= others, (host, sorted(held - policy))
            # The weekly ones hA took in its first turn are still whole on
            # both hosts, with what the volume held when they were taken.
            for name in sorted(policy)[:2]:
                number = sorted(created, key=created.get).index(name)
                text = pair[host].run(['cat', '%s/%s/cycle' % (
                    SNAPDIR, name)]).stdout
                assert text == 'hA %d' % number, (host, name)
    finally:
        pair.stop_receivers()
