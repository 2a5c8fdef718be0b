"""``task``: a command run on a schedule, only where the service runs.

SlapOS nodes run periodic commands (``slapos node instance``, ``report``,
``software``) that must run on the owner of the node and nowhere else: two
hosts talking to the master with the same node certificate, or a standby
re-adding every partition address with ``node format``, break the takeover
(reference/slapos-lab-takeover.md, trap 5). A ``task`` is such a command,
enabled by start and disabled by stop, so it follows the service::

    [task#instance]
    command = slapos node instance --now
    schedule = 1m
    timeout = 30m

Runs are on a grid of ``schedule`` from start (at start itself too with
``run_at_start``). Never two at once: a slot that comes while a run is
still going is skipped, not queued, so a slow command does not pile up. A run
that goes past ``timeout`` is killed. Each run is a background process in the
resource's cgroup; when its main process exits, whatever it left in the
cgroup is killed, so that runs cannot overlap through leftovers. The output
of every run is appended to ``<log_dir>/<service>.task.<name>.log``, between
a line saying when it started and one with its exit code.

**The agent must call** :meth:`Task.tick` **often** (every agent cycle,
about 0.1 s): it starts a run that is due and reaps one that ended or went
past its timeout. Nothing runs without it; ``status`` only reports.

A task is neither up nor down: ``status`` is ``n/a`` with the last run and
the next, or ``warn`` when the last run failed.
"""

import math
import os
import subprocess
import time
from collections import namedtuple

from slaposha.cgroup import CgroupError
from slaposha.schema import REQUIRED, Key
from slaposha.resources import (
    NA, WARN, Resource, ResourceError, Status, register)
from slaposha.units import human_seconds

__all__ = ['Task']

# One finished run: wall-clock start, seconds it took, exit code (negative:
# killed by that signal; None: it could not be run), and why it failed if
# the code does not say (a timeout, an error launching it).
Run = namedtuple('Run', 'started duration code reason')


def _clock(wall):
    return time.strftime('%H:%M:%S', time.localtime(wall))


@register
class Task(Resource):
    """a command run every so often while the service runs on this host"""

    kind = 'task'
    ticks = True
    keys = (
        Key('command', 'string', REQUIRED, 'shell command to run'),
        Key('schedule', 'duration', REQUIRED, 'run it every this long while'
            ' the service runs on this host (a run still going when the next'
            ' is due makes it skip that one)', minimum=0.1),
        Key('run_at_start', 'boolean', False, 'also run it as soon as the'
            ' service starts here'),
        Key('timeout', 'duration', 3600.0, 'a run that takes longer is'
            ' killed', minimum=0.1),
    )

    @classmethod
    def validate(cls, section):
        if not section.command:
            return 'command: must not be empty'
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.enabled = False
        self.anchor = None       # monotonic time the schedule counts from
        self.next_due = None     # monotonic time of the next run
        self.proc = None         # the run going on, if any
        self.run_wall = None     # its start, wall clock and monotonic
        self.run_mono = None
        self.last = None         # the last finished Run

    def _log_path(self):
        return os.path.join(self.context.log_dir, '%s.%s.log' % (
            self.context.name, self.rid.replace('#', '.')))

    def _log(self, line=None):
        os.makedirs(self.context.log_dir, exist_ok=True)
        log = open(self._log_path(), 'ab')
        if line is not None:
            log.write(('# %s %s\n' % (time.strftime('%Y-%m-%d %H:%M:%S'),
                                      line)).encode())
            log.flush()
        return log

    # -- the schedule --------------------------------------------------------

    def _next_slot(self, now):
        """The first slot of the grid strictly after ``now``."""
        period = self.conf.schedule
        return self.anchor + period * (
            math.floor((now - self.anchor) / period) + 1)

    def _first_due(self, now):
        """When the first run is due after start (monotonic)."""
        return now if self.conf.run_at_start else now + self.conf.schedule

    def _argv(self):
        """The run's command line, and how its log names it."""
        return ['sh', '-c', self.conf.command], self.conf.command

    def _ended(self, run):
        """A run was recorded in ``self.last`` (for kinds that learn from
        it)."""

    def _launch(self, now):
        self.next_due = self._next_slot(now)
        self.run_wall, self.run_mono = time.time(), now
        argv, shown = self._argv()
        try:
            log = self._log('run: %s' % shown)
        except OSError as e:
            self.last = Run(self.run_wall, 0.0, None, 'cannot open its log'
                            ' %s: %s' % (self._log_path(), e.strerror or e))
            self._ended(self.last)
            return
        try:
            self.proc = subprocess.Popen(
                self.cgroup.wrap(argv),
                stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self.last = Run(self.run_wall, 0.0, None, 'cannot run it: %s'
                            % (e.strerror or e))
            self._ended(self.last)
        finally:
            log.close()

    def _reap(self, now, reason=None):
        """Record the run that ended (its main process is dead) and kill
        whatever it left behind."""
        proc, self.proc = self.proc, None
        code = proc.wait()
        duration = now - self.run_mono
        try:
            self.cgroup.kill()
        except CgroupError as e:
            reason = reason or 'left processes that survive SIGKILL: %s' % e
        self.last = Run(self.run_wall, duration, code, reason)
        self._ended(self.last)
        try:
            with self._log('%s after %s' % (self._outcome(self.last),
                                            human_seconds(duration))):
                pass
        except OSError:
            pass

    def tick(self):
        """Start a run that is due, reap one that ended, kill one past its
        timeout. Cheap when there is nothing to do; never raises for a
        failed run (status tells)."""
        now = time.monotonic()
        if self.proc is not None:
            if self.proc.poll() is not None:
                self._reap(now)
            elif now - self.run_mono > self.conf.timeout:
                try:
                    self.cgroup.kill()
                except CgroupError:
                    pass  # _reap waits for the main process and says it
                self._reap(now, 'killed after the %s timeout'
                           % human_seconds(self.conf.timeout))
        if not self.enabled or self.proc is not None:
            return
        if now >= self.next_due:
            self._launch(now)

    # -- verbs ---------------------------------------------------------------

    def start(self):
        try:
            self.cgroup.create()
        except CgroupError as e:
            raise ResourceError('%s: %s' % (self.rid, e))
        if self.enabled:
            return
        self.enabled = True
        now = time.monotonic()
        self.anchor = now
        self.next_due = self._first_due(now)
        if self.next_due <= now:
            self._launch(now)

    def stop(self):
        self.enabled = False
        try:
            self.cgroup.kill()
        except CgroupError as e:
            raise ResourceError('%s: cannot stop the run in progress: %s'
                                % (self.rid, e))
        if self.proc is not None:
            self._reap(time.monotonic(), 'killed by stop')
        self.cgroup.remove()

    def fence(self):
        self.enabled = False
        self.cgroup.kill()
        if self.proc is not None and self.proc.poll() is not None:
            self._reap(time.monotonic(), 'killed by fence')

    def suspend(self):
        """A run in progress is killed, as by a fence (a task may be a
        slapgrid run or an export: no run waits frozen for a lease that may
        be lost); the schedule stops until resume()."""
        self._was_enabled = self.enabled
        self.fence()

    def resume(self):
        """The schedule goes on; a run due meanwhile starts at once."""
        self.enabled = getattr(self, '_was_enabled', False)

    def status(self):
        now = time.monotonic()
        parts = []
        if self.proc is not None:
            parts.append('running since %s (%s)' % (
                _clock(self.run_wall), human_seconds(now - self.run_mono)))
        if self.last is not None:
            parts.append('last run %s, %s, %s' % (
                _clock(self.last.started), self._outcome(self.last),
                human_seconds(self.last.duration)))
        if not self.enabled:
            return Status(NA, '; '.join(['not scheduled here'] + parts))
        if self.proc is None and not parts:
            parts.append('no run yet')
        parts.append('next in %s' % human_seconds(max(0.0, self.next_due - now)))
        failed = self.last is not None and (
            self.last.code != 0 or self.last.reason is not None)
        return Status(WARN if failed else NA, '; '.join(parts))

    @staticmethod
    def _outcome(run):
        if run.code is None:
            return run.reason
        if run.reason:
            return run.reason
        if run.code < 0:
            return 'killed by signal %d' % -run.code
        return 'exit %d' % run.code
