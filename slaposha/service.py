"""A service at run time: its resources, started in order, stopped in
reverse, and fenced at once when the lease is lost."""

import logging
import threading
import time
from collections import namedtuple

from slaposha.cgroup import CgroupError
from slaposha.resources import Cancel, ResourceError, driver
from slaposha.resources.data import DataResource

logger = logging.getLogger(__name__)


def _why(error):
    """One line for a resource's failure; a driver's unexpected exception
    (not a ResourceError) names its type."""
    if isinstance(error, (ResourceError, OSError)):
        return str(error)
    return '%s: %s' % (type(error).__name__, error)

__all__ = ['Service', 'ServiceError', 'Context']

# cancel: the service's Cancel, that its drivers check between the steps
# of their start (None: a resource alone, as in tests).
Context = namedtuple('Context', 'name cgroup log_dir cancel',
                     defaults=(None,))

# Seconds a fenced resource's start or stop (killed with its cgroup) is
# given to end; one still going on then keeps the service busy.
LINGER = 5.0


class ServiceError(Exception):
    """A start or stop that failed, naming the resource."""

    def __init__(self, rid, message):
        self.rid = rid
        super().__init__(message)


class _Overran(Exception):
    """A resource's start or stop still going on at the deadline, in
    ``thread``."""

    def __init__(self, what, thread):
        self.thread = thread
        super().__init__(what)


def _bounded(call, deadline, what):
    """``call()`` within ``deadline`` (monotonic; None: unbounded): its
    exception is raised here; still going on at the deadline, _Overran (it
    goes on in its thread: the caller fences the resource, which ends it,
    and waits for the thread)."""
    if deadline is None:
        return call()
    outcome = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise _Overran(what, thread)
    if outcome and outcome[0] is not None:
        raise outcome[0]


class Service(object):
    """The resources of one service on this host."""

    def __init__(self, conf, cgroup_root, log_dir):
        self.conf = conf
        self.name = conf.name
        self.cgroup = cgroup_root.child(conf.name)
        self.cancel = Cancel()
        self.context = Context(conf.name, self.cgroup, log_dir, self.cancel)
        self._lingering = []       # [(rid, thread)] fenced, still going on
        self.resources = []
        for section in conf.resources:
            if section.disable:
                continue
            self.resources.append(driver(section.kind)(section,
                                                       self.context))

    def start(self, may_go_on=None, timeout=None):
        """Start every resource in order. ``may_go_on()`` is asked before
        each one (the lease may be lost meanwhile). On a failure, what was
        started is stopped again and ServiceError names the resource. With
        ``timeout`` (``[service] start_timeout``), a resource still starting
        then is fenced and what started is stopped again: the start is
        undone, and ServiceError says it overran. A fence meanwhile
        (:meth:`fence`) cancels the start: no resource starts after it, and
        what a step did after the fence is fenced again at the end."""
        busy = self.busy()
        if busy:
            raise ServiceError(busy, 'not started: the last start or stop'
                               ' of %s, fenced, still goes on' % busy)
        self.cancel.clear()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.cgroup.create()
        except CgroupError as e:
            # Before anything runs: the agent applies on_failure and
            # releases the owner key it cannot honour.
            raise ServiceError('cgroup', str(e))
        started = []
        try:
            for res in self.resources:
                if self.cancel.is_set():
                    raise ServiceError(res.rid, 'start cancelled before %s:'
                                       ' the service was fenced' % res.rid)
                if may_go_on is not None and not may_go_on():
                    raise ServiceError(res.rid, 'start aborted before %s:'
                                       ' the lease is no longer held'
                                       % res.rid)
                try:
                    _bounded(res.start, deadline, '%s %s start' % (
                        self.name, res.rid))
                except _Overran as e:
                    logger.warning('service %s: %s still starting after'
                                   ' start_timeout (%gs): undone', self.name,
                                   res.rid, timeout)
                    self.cancel.set()  # for good: it never goes on
                    self._fence_one(res)
                    self._linger(res, e.thread)
                    raise ServiceError(res.rid, 'did not start within'
                                       ' start_timeout (%gs): stopped again'
                                       % timeout)
                except Exception as e:  # a driver's bug too: never half-run
                    if self.cancel.is_set():
                        started.append(res)
                        raise ServiceError(res.rid, 'start cancelled at %s:'
                                           ' the service was fenced (%s)' % (
                                               res.rid, _why(e)))
                    if res.conf.optional:
                        continue
                    started.append(res)
                    raise ServiceError(res.rid, _why(e))
                started.append(res)
            if self.cancel.is_set():  # fenced during the last one
                raise ServiceError(started[-1].rid if started else 'cgroup',
                                   'start cancelled: the service was fenced')
        except ServiceError:
            self._undo(started)
            if self.cancel.is_set():
                # What a step did after the fence (a process, an address)
                # goes too, now that no step runs any more.
                self.fence()
            raise

    def busy(self):
        """The resource whose start or stop, fenced, still goes on in its
        thread, or None."""
        self._lingering = [(rid, t) for rid, t in self._lingering
                           if t.is_alive()]
        return self._lingering[0][0] if self._lingering else None

    def _linger(self, res, thread):
        """Wait for a fenced resource's start or stop to end, bounded; one
        still going on is kept: the service is busy (:meth:`busy`)."""
        thread.join(LINGER)
        if thread.is_alive():
            logger.warning('service %s: %s still runs %gs after its fence',
                           self.name, res.rid, LINGER)
            self._lingering.append((res.rid, thread))
        else:
            self._fence_one(res)  # what it did after the first fence

    def _undo(self, started):
        for res in reversed(started):
            try:
                res.stop()
            except Exception:
                res.fence()

    def _fence_one(self, res):
        try:
            res.fence()
        except Exception as e:
            logger.warning('service %s: %s: fence failed: %s', self.name,
                           res.rid, _why(e))

    def stop(self, timeout=None):
        """Stop every resource in reverse order; ServiceError names the
        first that failed (the others are still stopped). With ``timeout``
        (``[service] stop_timeout``), a resource still stopping then, and
        those after it, are fenced instead, and ServiceError says so: the
        agent checks that they are down before it lets the service go."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = None
        for res in reversed(self.resources):
            if deadline is not None and time.monotonic() >= deadline:
                self._fence_one(res)
                failed = failed or ServiceError(
                    res.rid, 'not stopped within stop_timeout (%gs):'
                    ' fenced' % timeout)
                continue
            try:
                _bounded(res.stop, deadline, '%s %s stop' % (self.name,
                                                             res.rid))
            except _Overran as e:
                self._fence_one(res)
                self._linger(res, e.thread)
                failed = failed or ServiceError(
                    res.rid, 'did not stop within stop_timeout (%gs):'
                    ' fenced' % timeout)
            except Exception as e:
                failed = failed or ServiceError(res.rid, _why(e))
        if failed:
            raise failed
        self.cgroup.remove()

    def suspend(self, timeout=0.5):
        """The lease renewal is late (DESIGN.md 2): every process frozen at
        once (the service's cgroup, within ``timeout``), then each
        resource suspended in reverse order (addresses dropped; a task's
        run killed; the data kept). What cannot be suspended is fenced
        instead: returns one line per such resource; the whole service is
        fenced when its processes cannot be frozen."""
        try:
            frozen = self.cgroup.freeze(timeout)
        except CgroupError as e:
            frozen, why = False, str(e)
        else:
            why = 'its processes were not all frozen within %gs' % timeout
        if not frozen:
            self.fence()
            return ['%s: fenced instead' % why]
        fenced = []
        for res in reversed(self.resources):
            try:
                res.suspend()
            except Exception as e:  # where in doubt: killed
                self._fence_one(res)
                fenced.append('%s: cannot suspend (%s): fenced' % (
                    res.rid, _why(e)))
        return fenced

    def resume(self, timeout=0.5):
        """The lease was renewed in time after all: the processes thawed,
        then each resource resumed in order (addresses back and announced).
        Returns one line per resource that did not resume (the monitor
        finds it down)."""
        problems = []
        try:
            if not self.cgroup.thaw(timeout):
                problems.append('cgroup: not thawed within %gs' % timeout)
        except CgroupError as e:
            problems.append('cgroup: %s' % e)
        for res in self.resources:
            try:
                res.resume()
            except Exception as e:
                problems.append('%s: cannot resume: %s' % (res.rid, _why(e)))
        return problems

    def fence(self):
        """Kill everything now: resources' own fence, then the cgroup. A
        start under way is cancelled for good."""
        self.cancel.set()
        for res in reversed(self.resources):
            self._fence_one(res)  # the cgroup kill below still runs
        self.cgroup.kill()

    def tick(self):
        """Every agent cycle, for drivers that work on a schedule (task)."""
        for res in self.resources:
            res.tick()

    def ticks(self):
        """Whether a resource has work on a schedule (Resource.ticks)."""
        return any(res.ticks for res in self.resources)

    def data(self):
        """The resources whose data moves between hosts (btrfs, rsync)."""
        return [res for res in self.resources
                if isinstance(res, DataResource)]

    def configure(self, token, peers, tls, host):
        """On the owner, before a start: what each resource sends to the
        standbys needs (Resource.configure)."""
        for res in self.resources:
            res.configure(token, peers, tls, host)

    def status(self):
        """[(rid, Status)] of every resource."""
        return [(res.rid, res.status()) for res in self.resources]

    def facts(self):
        """{rid: what the resource publishes} for resources that do."""
        facts = {}
        for res in self.resources:
            published = res.publish()
            if published is not None:
                facts[res.rid] = published
        return facts

    def problems(self, facts):
        """Why this host cannot take the service over: one line per
        problem, each naming its resource."""
        lines = []
        for res in self.resources:
            if res.rid in (facts or {}):
                lines += ['%s: %s' % (res.rid, p)
                          for p in res.problems(facts[res.rid])]
        return lines

    def reports(self):
        """{rid: report} of the resources that report to the owner what
        this standby has."""
        found = {}
        for res in self.resources:
            try:
                report = res.report()
            except Exception as e:  # a driver's bad day is not the loop's
                logger.warning('service %s: %s: no report: %s', self.name,
                               res.rid, e)
                continue
            if report is not None:
                found[res.rid] = report
        return found

    def reported(self, reports):
        """On the owner: {host: {rid: report} or None} from the standbys,
        handed to each resource as {host: its report or None}."""
        for res in self.resources:
            res.reported({host: (by_rid or {}).get(res.rid)
                          for host, by_rid in reports.items()})

    def fence_targets(self):
        cgroups, addresses = [self.cgroup.path], []
        for res in self.resources:
            try:
                c, a = res.fence_targets()
            except Exception as e:  # a driver's bug must not stop the cycle
                logger.warning('service %s: %s: fence targets unknown: %s',
                               self.name, res.rid, e)
                continue
            addresses.extend(a)
        return cgroups, addresses
