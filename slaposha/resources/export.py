"""``export``: the service's data exported to a folder every day, by
whichever host runs the service.

The seed's daily export (SlapOS's resilient stack, OpenSVC's advanced
level): a ``task`` that runs ``slaposha export`` on the service file, so it
runs only on the owner and moves with the service::

    [export#daily]
    to = /backup/slapgrid
    every = 1d
    incremental = yes
    full_every = 7
    keep = 7

``to`` should be a folder every host that may run the service reaches (a
shared mount): then the next export after a takeover is due one ``every``
after the last one there, whoever made it, and incremental against it when
the new owner still has its snapshot (else full, and it says so). Each run
deletes the oldest exports of the service in ``to`` beyond ``keep``, never
one that a kept incremental export needs (:func:`slaposha.backup.
prune_exports`). A failed run is tried again after ``retry``.

``status`` says when the last export was made, of which snapshot, its size
and age; ``warn`` when the last run failed ("last export failed 3h ago:
<why>") or when the newest export in ``to`` is older than twice ``every``
("no export for 26h"): ``slaposha status`` lists either as the service's
problem, on any host (the owner publishes it under its token). The
folder is read in a thread of its own and by the run's process, never by
the agent's loop: a hung mount stalls the export, not the agent.
"""

import json
import os
import re
import sys
import threading
import time

from slaposha.schema import REQUIRED, Key
from slaposha.resources import NA, WARN, Status, register
from slaposha.resources.task import Task
from slaposha.units import human_age, human_bytes, human_seconds

__all__ = ['Export']


def _utc(wall):
    return time.strftime('%Y-%m-%d %H:%M', time.gmtime(wall))


@register
class Export(Task):
    """an export of the service's data to a folder, every day, on its owner"""

    kind = 'export'
    keys = (
        Key('to', 'path', REQUIRED, 'the folder the exports go to (a shared'
            ' mount every host of the service reaches, so that the series'
            ' goes on after a takeover)'),
        Key('every', 'duration', 86400.0, 'an export this long after the'
            ' last one in the folder (1d: daily); status warns when the'
            ' newest is older than twice this', minimum=1.0),
        Key('incremental', 'boolean', True, 'only what changed since the'
            ' previous export in the folder, when this host still has its'
            ' snapshot (else a full one)'),
        Key('full_every', 'integer', 7, 'with incremental: every this'
            ' many exports, a full one (a chain of incremental exports is'
            ' deleted only whole, once keep newer ones follow it)',
            minimum=1),
        Key('keep', 'integer', 7, 'exports of the service kept in the'
            ' folder; older ones are deleted unless a kept incremental'
            ' export needs them', minimum=1),
        Key('delay', 'duration', 60.0, 'the first export after the service'
            ' starts on a host waits at least this long (for the first'
            ' snapshots there)', minimum=0.0),
        Key('retry', 'duration', 3600.0, 'a failed export is tried again'
            ' after this (at most every)', minimum=1.0),
        Key('timeout', 'duration', 3600.0, 'an export that takes longer is'
            ' killed and deleted', minimum=1.0),
    )

    @classmethod
    def validate(cls, section):
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.newest = None    # the newest export in the folder (its .json)
        self.looked = False   # whether the folder was read since start
        self.failed = None    # (wall clock, why) of the last failed run

    # -- the schedule --------------------------------------------------------

    def _next_slot(self, now):
        # Until the run says otherwise (_ended).
        return now + self.conf.every

    def _first_due(self, now):
        return now + self.conf.delay

    def start(self):
        was = self.enabled
        super().start()
        if not was:
            self.looked = False
            threading.Thread(target=self._look, name='%s %s' % (
                self.context.name, self.rid), daemon=True).start()

    def _look(self):
        """The newest export of the service in the folder, as it is now."""
        from slaposha.backup import exports_in
        found = exports_in(self.conf.to, None, self.context.name)
        if found and (self.newest is None or found[-1].get('exported', 0) >
                      self.newest.get('exported', 0)):
            self.newest = found[-1]
        self.looked = True
        self._reschedule()

    def _reschedule(self):
        exported = (self.newest or {}).get('exported')
        if self.enabled and self.proc is None and \
                isinstance(exported, (int, float)):
            now = time.monotonic()
            due = now + (exported + self.conf.every - time.time())
            # Never sooner than delay after the start.
            self.next_due = max(due, self.anchor + self.conf.delay)

    def _argv(self):
        argv = [sys.executable, '-m', 'slaposha.cli.main', 'export',
                self.conf._service_file, '--to', self.conf.to, '--keep',
                str(self.conf.keep), '--timeout',
                '%g' % max(1.0, self.conf.timeout - 5), '--json']
        if self.conf.incremental:
            argv += ['--incremental', '--full-every',
                     str(self.conf.full_every)]
        return argv, 'slaposha export %s --to %s --keep %d%s' % (
            self.context.name, self.conf.to, self.conf.keep,
            ' --incremental' if self.conf.incremental else '')

    def _ended(self, run):
        if run.reason in ('killed by stop', 'killed by fence'):
            # Undone with the service here (its next owner exports), or
            # suspended: tried again after retry once resumed.
            self.next_due = time.monotonic() + min(self.conf.retry,
                                                   self.conf.every)
            return
        done, said = self._outcome_of_run()
        if run.code == 0 and done:
            self.newest = done[-1]
            self.failed = None
            self._reschedule()
            return
        why = run.reason or said or 'exit %s' % run.code
        # "last export failed" says the rest: the problem line keeps the why.
        why = re.sub(r'^export of \S+ failed, nothing kept: ', '', why)
        self.failed = (run.started, why)
        self.next_due = time.monotonic() + min(self.conf.retry,
                                               self.conf.every)

    def _outcome_of_run(self):
        """(the exports the last run made, its last line of text) from the
        end of its log."""
        try:
            with open(self._log_path(), 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                lines = f.read().decode(errors='replace').splitlines()
        except OSError as e:
            return [], 'cannot read its log: %s' % (e.strerror or e)
        # Only this run's lines: after its "# ... run:" line.
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith('# ') and ' run: ' in lines[i]:
                lines = lines[i + 1:]
                break
        done, said = [], None
        for line in lines:
            if line.startswith('# '):
                continue
            try:
                meta = json.loads(line)
            except ValueError:
                meta = None
            if isinstance(meta, dict) and meta.get('snapshot'):
                done.append(meta)
            elif line.strip():
                said = line.strip()
                if said.startswith('slaposha: '):
                    said = said[len('slaposha: '):]
        return done, said

    # -- status --------------------------------------------------------------

    def status(self):
        if not self.enabled:
            return Status(NA, 'not scheduled here')
        now, wall = time.monotonic(), time.time()
        parts = []
        state = NA
        if self.proc is not None:
            parts.append('export running since %s (%s)' % (
                time.strftime('%H:%M:%S', time.localtime(self.run_wall)),
                human_seconds(now - self.run_mono)))
        if self.failed is not None:
            state = WARN
            parts.append('last export failed %s ago: %s' % (
                human_age(max(0.0, wall - self.failed[0])), self.failed[1]))
        last = self.newest
        exported = (last or {}).get('exported')
        if isinstance(exported, (int, float)):
            age = max(0.0, wall - exported)
            if age > 2 * self.conf.every:
                state = WARN
                parts.append('no export for %s' % human_age(age))
            parts.append('last export %s UTC (%s ago): %s, %s, %s' % (
                _utc(exported), human_age(age), last.get('snapshot'),
                human_bytes(last.get('bytes') or 0),
                'incremental' if last.get('parent') else 'full'))
        elif self.looked:
            parts.append('no export in %s yet' % self.conf.to)
        if self.proc is None:
            parts.append('next in %s' % human_age(max(0.0, self.next_due -
                                                      now)))
        return Status(state, '; '.join(parts))

    def exported(self):
        """For the metrics: (the newest export's description or None,
        whether the last run failed)."""
        return self.newest, self.failed is not None
