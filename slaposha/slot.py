"""A service on this host, as the agent knows it: its :class:`ServiceSlot`
(state, owner, token, last decision, what it checked and published) and
the :class:`Worker` that starts, restarts or stops it beside the decision
loop.
"""

import threading
import time

__all__ = ['ServiceSlot', 'Worker', 'STOPPED', 'RUNNING', 'STOP_FAILED',
           'STARTING', 'STOPPING']

# A service's state on this host. STARTING and STOPPING: its worker starts
# (or restarts) it, or stops it.
STOPPED, RUNNING, STOP_FAILED = 'stopped', 'running', 'stop failed'
STARTING, STOPPING = 'starting', 'stopping'


class Worker(object):
    """One start, restart or stop of a service, in a thread of its own
    beside the decision loop (DESIGN.md 7): the loop goes on deciding for
    the other services and watching its lease meanwhile, and carries on
    with this service (``then(worker)``, in the loop) once it ended. At
    most one per service: the decisions for it wait for it."""

    def __init__(self, name, what, work, then, on_end):
        self.what = what           # 'start', 'restart' or 'stop'
        self.then = then
        self.result = None         # what work() returned
        self.error = None          # what it raised
        self.began = time.time()
        self._work = work
        self._on_end = on_end
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name='%s %s' % (name, what))
        self.thread.start()

    def _run(self):
        try:
            self.result = self._work()
        except Exception as e:
            self.error = e
        finally:
            self._on_end()

    def alive(self):
        return self.thread.is_alive()


class ServiceSlot(object):
    """What the agent knows of one service on this host."""

    def __init__(self, service, ownership, on_end):
        self.service = service
        self._on_end = on_end      # wakes the loop once a worker ended
        self.conf = service.conf.service
        self.ownership = ownership
        self.state = STOPPED
        self.owner = None          # host named by the owner key
        self.token = None          # fencing token while owned here
        self.decision = None       # (time, action, reason)
        self.view = None           # its intents and owner, as last read
        self.failures = 0
        self.failed_until = 0.0
        self.next_check = 0.0
        self.fenced = False        # killed by a fence: clean up, no release
        self.worker = None         # its start or stop under way (Worker)
        self.lingering = None      # a fenced resource still going on
        self.cancelled = None      # why its start was cancelled, the owner
        #                            key still ours (an operator's stop)
        self.suspended = None      # monotonic time it was suspended at
        self.switching = None      # the switch its stop is for
        self.seen_owner = False    # an owner was seen since the agent began
        self.resources = []        # [(rid, state, message)] last checked
        self.details = {}          # rid: more status lines (partitions)
        self.published = None
        self.facts = None          # what the owner last published of them
        self.next_facts = 0.0      # when the owner computes them again
        self.checked_facts = None  # the owner's facts this standby checked
        self.report = {}           # rid: what this standby has, for the owner
        self.lags = {}             # rid: age of this host's copy (standby)
        self.owner_had_data = False  # an owner was seen: data exists there
        self.ineligible = []       # why this host may not take it over
        self.next_eligibility = 0.0
        self.waits_for_copy = False  # ineligible until a copy lands here
        self.owner_token = None    # the owner's token, wherever it runs
        self.last_owner = None     # (host, wall time) the owner key was
        #                            last seen held: a takeover's "from"
        self.diverged = []         # the diverged copies kept on this host
        self.next_diverged = 0.0

    def forget_key(self):
        """The owner key is not ours (any more), or goes with the lease:
        its token is forgotten here."""
        self.ownership.forget()
        self.token = None

    def may_go_on(self, lease):
        """Whether a start under way may go on: ``lease`` (not a later
        one) and this token still hold, and no fence came."""
        token = self.token
        return lambda: lease.valid and self.token == token and \
            not self.fenced

    def spawn(self, what, state, work, then):
        """Its ``what`` ('start', 'restart', 'stop', 'restore') in a Worker,
        in ``state`` meanwhile: the agent's loop is woken once it ended."""
        self.state = state
        self.worker = Worker(self.service.name, what, work, then,
                             self._on_end)

    def carry_on(self):
        """The loop's part after a worker that ended: its ``then``."""
        worker = self.worker
        if worker is not None and not worker.alive():
            self.worker = None
            worker.then(worker)
