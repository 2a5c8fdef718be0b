"""Resources: the parts of a service, one driver module per kind.

Every driver has the same verbs (OpenSVC's taxonomy): ``start``, ``stop``,
``status`` and optionally ``provision``, plus ``fence``: the fast, blocking-
free kill that self-fencing uses at the lease's kill deadline, and
``suspend`` / ``resume`` for a lease renewal that is late (DESIGN.md 2).
Every verb the agent calls is declared on :class:`Resource`, those a
driver may leave out as documented no-ops (``configure``, ``tick``,
``publish`` / ``problems``, ``report`` / ``reported``); the data drivers'
contract is :class:`slaposha.resources.data.DataResource`. A driver
declares its configuration keys (``keys``, :mod:`slaposha.schema`) and
registers its class (:func:`register`), so that service files are
validated in one place (:mod:`slaposha.config`).
"""

import contextlib
import importlib
import os
import subprocess
import threading
import time
from collections import namedtuple

__all__ = ['Resource', 'ResourceError', 'Status', 'UP', 'DOWN', 'WARN', 'NA',
           'Cancel', 'driver', 'DRIVERS', 'copy_folder']

UP, DOWN, WARN, NA = 'up', 'down', 'warn', 'n/a'



class Status(namedtuple('Status', 'state message')):
    """A resource's state (UP, DOWN, WARN, NA) and one line saying why;
    ``details``: more lines for the status tree (e.g. one per partition of
    a SlapOS node), not part of the tuple."""

    def __new__(cls, state, message, details=()):
        self = super().__new__(cls, state, message)
        self.details = list(details)
        return self


class ResourceError(Exception):
    """A resource failed to start or stop, as one line saying why."""


# Seconds a launch may take to put its process in the cgroup (a fork and
# the wrapper's write to cgroup.procs: milliseconds).
LAUNCH_WAIT = 2.0


class Cancel(object):
    """The cancellation of a service's start: set by the fence (lease lost,
    owner key lost, start_timeout overrun), checked by the drivers between
    the steps of their start (:meth:`Resource.go_on`), and by each launch
    of a process (:meth:`Resource.launch`): a process is either in its
    cgroup before the fence kills the cgroup, or never launched. Without it
    a start that goes on in its thread after the fence could launch a
    process again, on a host that no longer owns the service."""

    def __init__(self):
        self._event = threading.Event()
        self._launching = threading.Lock()

    def set(self):
        # A launch under way ends first (bounded: the fence never waits
        # long): its process is in the cgroup the fence then kills.
        held = self._launching.acquire(timeout=LAUNCH_WAIT)
        self._event.set()
        if held:
            self._launching.release()

    def clear(self):
        self._event.clear()

    def is_set(self):
        return self._event.is_set()

    @contextlib.contextmanager
    def launching(self, what):
        with self._launching:
            if self._event.is_set():
                raise ResourceError('%s: start cancelled: the service was'
                                    ' fenced' % what)
            yield


def copy_folder(src, dst, delete, live=False):
    """Copy folder ``src`` into ``dst`` on this host, numeric owners,
    modes, ACLs, xattrs and times kept (what moves with a node: its
    identity, re6st's files); ``delete``: also remove what ``src`` lacks.
    ``live``: a program may be writing in ``src`` (re6st's state): a file
    that vanishes during the copy is no error, and SQLite's journal, WAL
    and shared-memory files are left out (the caller copies the databases
    with SQLite's backup; a stale WAL beside that copy could be replayed
    onto it)."""
    # Nanosecond mtimes: rsync's whole seconds would skip a file rewritten
    # with the same size within the second.
    args = ['rsync', '-aHAX', '--numeric-ids', '--modify-window=-1']
    if delete:
        args.append('--delete')
    if live:
        args += ['--exclude=*-journal', '--exclude=*-wal', '--exclude=*-shm']
        if delete:
            args.append('--delete-excluded')
    p = subprocess.run(args + [src.rstrip('/') + '/', dst.rstrip('/') + '/'],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    # 24: "some files vanished before they could be transferred".
    if p.returncode and not (live and p.returncode == 24):
        raise ResourceError('rsync %s to %s: %s' % (
            src, dst, p.stderr.strip()[-300:]))


def _joined(p, argv, deadline):
    """Wait until ``p``, launched by a ``cgroup.wrap`` command line, is in
    the cgroup that it names (or ended, or the deadline passed)."""
    procs = argv[3] if len(argv) > 3 and argv[0] == 'sh' else None
    if procs is None:
        return
    want = os.path.dirname(procs)
    while p.poll() is None and time.monotonic() < deadline:
        try:
            with open('/proc/%d/cgroup' % p.pid) as f:
                if any(line.startswith('0::') and want.endswith(
                        line[3:].strip()) for line in f):
                    return
        except OSError:
            return  # gone
        time.sleep(0.001)


# kind -> module; a kind's module registers its keys when imported.
DRIVERS = {
    'ip': 'slaposha.resources.ip',
    'fs': 'slaposha.resources.fs',
    'app': 'slaposha.resources.app',
    'task': 'slaposha.resources.task',
    'export': 'slaposha.resources.export',
    'btrfs': 'slaposha.resources.btrfs',
    'rsync': 'slaposha.resources.rsync',
    'drbd': 'slaposha.resources.drbd',
    'slapos': 'slaposha.resources.slapos',
    're6st': 'slaposha.resources.re6st',
}

_CLASSES = {}


def register(cls):
    """Class decorator of a driver: declares its kind, its keys with it."""
    _CLASSES[cls.kind] = cls
    return cls


def load_drivers():
    """Import every driver, so that service files can name their kinds."""
    for module in DRIVERS.values():
        try:
            importlib.import_module(module)
        except ImportError as e:
            if e.name != module:  # a driver not written yet is skipped
                raise


def driver_classes():
    """{kind: driver class} of every driver, in the order they load."""
    load_drivers()
    return dict(_CLASSES)


def check_section(section):
    """What its driver finds wrong with a resource section, or None."""
    cls = _CLASSES.get(section.kind)
    return cls.validate(section) if cls is not None else None


def driver(kind):
    load_drivers()
    return _CLASSES[kind]


class Resource(object):
    """Base of the drivers. ``section`` is the validated config section
    (``rid``, ``kind`` and the driver's keys); ``context`` gives what the
    service provides: its name, its cgroup, where logs go."""

    kind = None
    keys = ()

    def __init__(self, section, context):
        self.conf = section
        self.rid = section.rid
        self.context = context

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.rid)

    @property
    def cgroup(self):
        """A cgroup of this resource's own, below the service's."""
        return self.context.cgroup.child(self.rid.replace('#', '.'))

    @classmethod
    def validate(cls, section):
        """What is wrong with a section beyond each key's own check, as one
        line; None when it is right."""
        return None

    def start(self):
        raise NotImplementedError

    def go_on(self, step):
        """Called by a driver between the steps of its start: ResourceError
        once the start is cancelled (the service was fenced meanwhile), so
        that nothing more of it happens."""
        cancel = getattr(self.context, 'cancel', None)
        if cancel is not None and cancel.is_set():
            raise ResourceError('%s: start cancelled before %s: the service'
                                ' was fenced' % (self.rid, step))

    def launch(self, argv, **popen):
        """subprocess.Popen of ``argv`` (a ``cgroup.wrap`` command line) for
        a start: not once the start is cancelled, and the process is in the
        cgroup when this returns (a fence meanwhile waits for it, then
        kills it with the cgroup)."""
        cancel = getattr(self.context, 'cancel', None)
        if cancel is None:
            return subprocess.Popen(argv, **popen)
        with cancel.launching(self.rid):
            p = subprocess.Popen(argv, **popen)
            _joined(p, argv, time.monotonic() + LAUNCH_WAIT)
            return p

    def stop(self):
        raise NotImplementedError

    def status(self):
        raise NotImplementedError

    def provision(self):
        """Prepare what start needs (optional)."""

    def fence(self):
        """Stop at once, without waiting for anything: the lease is gone."""
        self.cgroup.kill()

    def suspend(self):
        """The lease renewal is late: this resource's processes are frozen
        with the service's cgroup already; a driver drops here what lets
        clients reach it (addresses) or kills what must not wait (a
        task's run). Quick and blocking-free, as fence."""

    def resume(self):
        """The lease was renewed before the kill deadline: undo suspend()
        (the processes are thawed already)."""

    def configure(self, token, peers, tls, host):
        """On the owner, before start (again when the standbys change):
        the owner key's fencing ``token``, the standbys ``{name:
        address}``, this host's TLS files (ca, cert, key) and name. For
        drivers that send something to the standbys (the data, a node's
        software releases)."""

    # Whether tick() has work on a schedule: while the service runs here,
    # the agent's loop then comes round every loop_interval.
    ticks = False

    def tick(self):
        """On the owner, every agent cycle while the service runs: work on
        a schedule (a task's runs, a copy to the standbys), never
        blocking the cycle."""

    # Drivers whose standbys must match the owner (same paths, same uids)
    # define both: publish() on the owner, problems() on each standby.
    def publish(self):
        """On the owner: what a standby must have the same (JSON-able),
        published again whenever it changes; None: nothing."""
        return None

    def problems(self, published):
        """Lines saying why this host cannot take over, given what the
        owner published; [] when it can."""
        return []

    # Drivers whose owner works from what each standby has (e.g. the
    # software releases it still lacks) define both: report() on each
    # standby (JSON-able, announced with its host's health), reported() on
    # the owner, every agent cycle, with {host: report or None}.
    def report(self):
        """On a standby: what it has, for the owner; None: nothing."""
        return None

    def reported(self, reports):
        """What each standby last reported (None: no report: not alive)."""

    def fence_targets(self):
        """(cgroups, addresses) that the watchdog kills and drops for this
        resource if the agent cannot."""
        return [self.cgroup.path], []
