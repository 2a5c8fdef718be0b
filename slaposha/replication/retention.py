"""Which snapshots a host keeps as backups: minutely, hourly, daily, weekly.

Replication copies a mistake within a second; the snapshots it takes are
crash-consistent points in time, so keeping some of them, spaced out, turns
the copies into backups at little cost (a btrfs snapshot holds only the
blocks changed since). A :class:`Retention` says which ones to keep beside
what replication itself keeps (the newest ``keep``, the newest each peer
has, the one the live volume descends from)::

    Retention(minutely=10, hourly=24, daily=7, weekly=4).keepers(
        snapshots, created)

For each step, the first snapshot (the oldest) of each of the newest
``count`` periods that hold a snapshot is kept: minutes, hours, days and ISO weeks
(from Monday) in UTC, of the time each snapshot was taken (``created``,
the owner's clock, carried to the standbys with the stream). Why the first
of a period rather than the last: it stays the same as newer snapshots
come, so each cycle deletes nothing it kept before except what falls out
of the counts, and every host that holds that snapshot keeps the same one
(a standby that missed some snapshots keeps the first it has). Why periods
that hold a snapshot rather than the last ``count`` hours by the clock: a
service stopped for a week still has its backups when it comes back.

A snapshot whose time is unknown (no metadata) is never kept by the policy;
retention never deletes anything by itself: :meth:`Volume.prune
<slaposha.replication.volume.Volume.prune>` deletes what nobody keeps.
"""

import time

__all__ = ['Retention', 'Clock', 'STEPS', 'DEFAULTS']

# (name, the period a time falls in): UTC minutes, hours, days, ISO weeks.
STEPS = (
    ('minutely', lambda t: int(t // 60)),
    ('hourly', lambda t: int(t // 3600)),
    ('daily', lambda t: int(t // 86400)),
    # 1970-01-01 was a Thursday: shift by 3 days so weeks begin on Monday.
    ('weekly', lambda t: int((t + 3 * 86400) // (7 * 86400))),
)

# Ten minutes at one-minute steps: a mistake noticed at once is undone
# with little lost; then a day of hours, a week of days, a month of weeks.
DEFAULTS = {'minutely': 10, 'hourly': 24, 'daily': 7, 'weekly': 4}


class Retention(object):
    """How many minutely, hourly, daily and weekly snapshots to keep (0:
    none of that step)."""

    def __init__(self, minutely=DEFAULTS['minutely'],
                 hourly=DEFAULTS['hourly'], daily=DEFAULTS['daily'],
                 weekly=DEFAULTS['weekly']):
        self.counts = {'minutely': int(minutely), 'hourly': int(hourly),
                       'daily': int(daily), 'weekly': int(weekly)}
        for step, count in self.counts.items():
            if count < 0:
                raise ValueError('%s: expected 0 or more, got %d'
                                 % (step, count))

    def __repr__(self):
        return '<Retention %s>' % self

    def __str__(self):
        return ', '.join('%s %d' % (step, self.counts[step])
                         for step, _ in STEPS)

    def __bool__(self):
        return any(self.counts.values())

    def keepers(self, names, created):
        """The names among ``names`` that the policy keeps, as {name: [the
        steps that keep it]}; ``created(name)``: when it was taken (wall
        clock seconds), or None."""
        times = []
        for name in names:
            when = created(name)
            if isinstance(when, (int, float)):
                times.append((when, name))
        times.sort()
        kept = {}
        for step, period in STEPS:
            count = self.counts[step]
            if not count:
                continue
            first = {}
            for when, name in times:
                first.setdefault(period(when), name)
            for key in sorted(first, reverse=True)[:count]:
                kept.setdefault(first[key], []).append(step)
        return kept


class Clock(object):
    """A clock a test can move (``advance``), given to a volume instead of
    the machine's for the time its snapshots are taken at."""

    def __init__(self, start=None):
        self.now = time.time() if start is None else float(start)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
        return self.now
