"""The partitions of a node at run time: which can start, which are set
aside and why, and what each one runs.

The instance supervisord reads every partition's program file
(``instance_root/etc/supervisord.conf.d/*.conf``) at once and refuses its
whole configuration for one bad file: a partition whose folder is gone
while its program file is still there (its log folder is missing), a file
it cannot parse, a user it does not know. On a new owner that would keep
every partition down for one damaged one (DESIGN.md 6). So, before the
instance supervisord starts:

- a started partition whose folder is missing is set aside at once;
- when supervisord still refuses its configuration, the partition whose
  file it names is set aside and it is started again;
- a partition whose programs fail to start is reported, the others run.

Setting aside renames the partition's program files from ``.conf`` to
``.slaposha-aside`` (supervisord includes ``*.conf`` only; slapgrid counts
them as the partition's own files, so its next start or destroy of that
partition replaces or removes them) and records why in
``instance_root/.slaposha/aside.json``, in the replicated data. The next
start of the node puts every file set aside back first and checks again:
a partition repaired meanwhile (its folder restored, or rebuilt by
slapgrid) starts again. While the node runs, its owner looks again every
``aside_retry`` seconds: a partition set aside for its missing folder,
whose folder is back, has its files
put back and is added to the running supervisord (``reloadConfig``, as
``supervisorctl update`` does) and started; one supervisord still refuses
goes aside again with the new reason.

:func:`partition_rows` says, for each partition in use, its requested
state, its programs and what is wrong; the ``slapos`` resource's status
and ``slaposha slapos partitions`` both show it.
"""

import json
import logging
import os
import re
import time

from slaposha.slapos.node import NodeError

__all__ = ['AsideBook', 'ASIDE_SUFFIX', 'missing_folders', 'refused_partition',
           'refusal_reason', 'partition_rows', 'row_line', 'load_saved']

logger = logging.getLogger(__name__)

ASIDE_SUFFIX = '.slaposha-aside'
# Programs that may end by themselves (slapgrid's etc/run "runners"); the
# services of etc/service are named <name>-on-watch and must run.
WATCHED = '-on-watch'


class AsideBook(object):
    """The partitions set aside on a node, with why and since when."""

    def __init__(self, node):
        self.node = node
        self.path = os.path.join(node.instance_root, '.slaposha',
                                 'aside.json')
        try:
            with open(self.path) as f:
                records = json.load(f)
        except FileNotFoundError:
            records = {}
        except (OSError, ValueError) as e:
            logger.warning('%s: unreadable, started again from nothing: %s',
                           self.path, e)
            records = {}
        self.records = records if isinstance(records, dict) else {}

    def _save(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.records, f, indent=1, sort_keys=True)
        os.rename(tmp, self.path)

    def current(self):
        """{partition: record} of the partitions still set aside: a record
        whose files slapgrid replaced (a fresh ``.conf``) or removed no
        longer counts."""
        fresh = self.node.program_files()
        aside = self.node.program_files(ASIDE_SUFFIX)
        return {pid: record for pid, record in self.records.items()
                if pid in aside and pid not in fresh}

    def set_aside(self, pid, reason, cause='refused'):
        """Move the program files of ``pid`` out of supervisord's reach and
        record why (``cause``: 'folder' when its folder is missing, which
        the owner looks at again while it runs); returns the files
        moved."""
        folder = self.node.supervisord_conf_dir
        moved = []
        for name in self.node.program_files().get(pid, []):
            os.rename(os.path.join(folder, name), os.path.join(
                folder, name[:-len('.conf')] + ASIDE_SUFFIX))
            moved.append(name)
        self.records[pid] = {'reason': reason, 'since': time.time(),
                             'files': moved, 'cause': cause}
        self._save()
        return moved

    def _put_back(self, names):
        folder = self.node.supervisord_conf_dir
        for name in names:
            aside = os.path.join(folder, name)
            conf = os.path.join(folder, name[:-len(ASIDE_SUFFIX)] + '.conf')
            if os.path.exists(conf):
                os.unlink(aside)
            else:
                os.rename(aside, conf)

    def restore(self):
        """Put back every file set aside (a fresh file of the same name,
        written by slapgrid meanwhile, wins) and forget the records: the
        next start checks each partition again."""
        for names in self.node.program_files(ASIDE_SUFFIX).values():
            self._put_back(names)
        if self.records:
            self.records = {}
            self._save()

    def repaired(self):
        """The partitions set aside for a missing folder whose folder is
        back."""
        return [pid for pid, record in sorted(self.current().items())
                if record.get('cause') == 'folder' and os.path.isdir(
                    os.path.join(self.node.instance_root, pid))]

    def put_back(self, pid):
        """Put back the files of ``pid`` alone and forget its record (a
        partition repaired while the node runs)."""
        self._put_back(self.node.program_files(ASIDE_SUFFIX).get(pid, []))
        if self.records.pop(pid, None) is not None:
            self._save()


def missing_folders(node):
    """{partition: reason} of the started partitions (a program file in
    supervisord.conf.d) whose folder is gone."""
    found = {}
    for pid, names in sorted(node.program_files().items()):
        folder = os.path.join(node.instance_root, pid)
        if not os.path.isdir(folder):
            found[pid] = 'its folder %s is missing while %s is still there' \
                % (folder, os.path.join('etc', 'supervisord.conf.d',
                                        names[0]))
    return found


_REFUSED = re.compile(r"'(/[^']+\.conf)'")


def refused_partition(node, output):
    """The partition whose program file supervisord names in the error it
    printed (``output``) when it refused its configuration, or None."""
    files = node.program_files()
    for path in _REFUSED.findall(output):
        if os.path.dirname(path) != node.supervisord_conf_dir:
            continue
        for pid, names in files.items():
            if os.path.basename(path) in names:
                return pid
    return None


def _first_error(output):
    for line in output.splitlines():
        line = line.strip()
        if line.startswith('Error:'):
            return line[len('Error:'):].strip()
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    return lines[0] if lines else 'no output'


def refusal_reason(output):
    """One line for a partition whose file supervisord refused."""
    return 'supervisord refuses its program file: %s' % _first_error(
        output)[:300]


def partition_rows(node, infos=None, saved=None, aside=None, failed=None):
    """One dict per partition in use, in order: ``id``, ``requested``
    (the master's state as last saved by ``slaposha slapos
    save-parameters``, else what the disk says: started or stopped),
    ``started`` (a program file is in place), ``programs`` ('2/2 running';
    None without ``infos``, supervisord's getAllProcessInfo) and
    ``problem`` (None, or what is wrong: set aside and why, programs that
    failed to start (``failed``: {partition: reason}) or that do not run).
    Free and destroyed partitions are left out."""
    aside = aside or {}
    failed = failed or {}
    kept = (saved or {}).get('partitions') or {}
    parts = {p.id: p for p in node.partitions()}
    ids = set(pid for pid, p in parts.items() if p.in_use)
    ids.update(node.program_files())
    ids.update(aside)
    groups = {}
    for info in infos or []:
        groups.setdefault(info['group'], []).append(info)
    rows = []
    for pid in sorted(ids, key=node.partition_key):
        part = parts.get(pid)
        started = part.started if part is not None else \
            pid in node.program_files()
        requested = (kept.get(pid) or {}).get('state')
        row = {'id': pid, 'started': started or pid in aside,
               'requested': requested or ('started' if started or
                                          pid in aside else 'stopped'),
               'programs': None, 'problem': None}
        programs = groups.get(pid, [])
        running = [i for i in programs if i['statename'] == 'RUNNING']
        if infos is not None and started:
            row['programs'] = '%d/%d running' % (len(running), len(programs))
        if pid in aside:
            record = aside[pid]
            row['problem'] = 'set aside since %s: %s' % (
                time.strftime('%H:%M:%S', time.localtime(
                    record.get('since') or 0)), record.get('reason'))
        elif pid in failed and (infos is None or not programs or
                                len(running) < len(programs)):
            row['problem'] = failed[pid]
        elif part is None and started:
            row['problem'] = 'its folder %s is missing' % os.path.join(
                node.instance_root, pid)
        elif infos is not None and started:
            stopped = ['%s %s' % (i['name'], i['statename'])
                       for i in programs if i['statename'] != 'RUNNING' and
                       (i['statename'] != 'EXITED' or
                        i['name'].endswith(WATCHED))]
            if not programs:
                row['problem'] = 'supervisord has no program of it'
            elif stopped:
                row['problem'] = 'not running: %s' % ', '.join(stopped[:3])
        rows.append(row)
    return rows


def row_line(row):
    """'slappart1  started  1/1 running' and what is wrong, on one line."""
    text = '%-10s %-9s' % (row['id'], row['requested'])
    if row.get('programs'):
        text += ' %s' % row['programs']
    if row.get('problem'):
        text += '  ! %s' % row['problem']
    return text.rstrip()


def load_saved(node):
    """What ``slaposha slapos save-parameters`` saved last, or None (not
    saved, or unreadable: status does without)."""
    from slaposha.slapos.parameters import ParametersError, load
    try:
        return load(node)
    except (ParametersError, NodeError):
        return None
