"""A seeded random sequence of faults with audits after every step, as
Pacemaker's cluster test suite does (issue #9: the demo, benchmarks and a
randomized fault suite).

Lab (``LAB_HOSTS``, made with ``paths=LAB_PATHS``): hA and hB run the
agents, hW, hW2 and hW3 are witnesses, so that etcd has five members and a
split of two hosts against three is a genuine minority against a majority
(with four members, two against two leaves no side a quorum). The service
`web` may run on hA or hB and carries real data: a ``btrfs`` resource (a
volume on each host's own btrfs disk, replicated every ``INTERVAL`` over
TLS) and a writer that appends numbered records to it, each made durable
with fsync before it logs ``ack N <time>`` to the host's disk outside the
volume (that log survives the crash). An observer outside every host polls
every 20 ms where the writer runs.

Each iteration waits for the cluster to settle (the service on one host,
etcd agreeing, and the standby holding a copy taken since the last heal),
injects one fault, waits for the cluster to settle again, checks the
audits, then heals everything (partitions joined, crashed hosts restarted).
The faults come as a shuffled deck: every fault once per round of
``len(FAULTS)`` iterations, in a random order drawn from the seed.

Faults: crash of the owner's host or of the standby's; partition of the
owner alone or of the standby alone; a split of the owner and one witness
against the standby and the two other witnesses (and the reverse: the
standby with one witness against the owner with two); the owner's agent
paused (SIGSTOP) past its lease; SIGKILL of a random etcd member; a planned
switch.

Audits (each violation is counted and printed):

- overlap: the service seen running on two hosts at once;
- minority: the owner cut off from the majority (alone, or with a witness)
  still running it (frozen or not) once the majority's owner key of it is
  gone or another host's, or ``FENCE_BOUND`` seconds after the cut; or the
  service found on the minority side once settled;
- absent: no host runs it longer than the budget while a quorum of etcd
  members answers;
- lost write: after a change of owner (or of token), the new owner's data
  is not a consistent prefix of the records (1, 2, ... in order, no gap,
  no duplicate: an old owner's divergent writes merged in would show), or
  it misses a record acknowledged more than ``RPO_BOUND`` seconds before
  the old owner lost the service (for a planned switch: any acknowledged
  record at all);
- not kept aside: an old owner that lost records in a takeover, once it
  holds a copy of the new owner's data, has no volume kept aside with
  every record it acknowledged (divergent writes must be kept for an
  operator, neither deleted nor merged);
- stale write: a write under the previous owner's token is accepted;
- stuck switch: ``slaposha switch`` neither done nor refused within
  ``SWITCH_WAIT`` seconds (its own line says what each host decided).

The bound of the lost-write audit. A record acknowledged at time t (after
its fsync) is in every snapshot taken after t. The owner begins a
replication cycle (snapshot, incremental send over TLS, receive, syncfs on
the standby) every ``INTERVAL`` seconds from the start of the previous one,
or at the next agent tick (every ``LOOP`` seconds) after a cycle that took
longer. With cycles of at most ``CYCLE`` seconds, the first snapshot after
t is taken by t + max(INTERVAL, CYCLE) + LOOP and is complete on the
standby CYCLE seconds later. So every record acknowledged by

    RPO_BOUND = max(INTERVAL, CYCLE) + LOOP + CYCLE

seconds before the owner lost the service (the moment of the fault: the
crash, the cut, the pause; after it nothing it writes can leave it) is on
the standby. CYCLE = 1 s is twice the longest cycle seen on this 2-core
machine while the suite runs (snapshot to complete on the standby: 0.05 to
0.5 s); with INTERVAL = 0.5 s the bound is 2.1 s, about four intervals,
and a loss beyond it means replication stalled or a copy lost data. The
records written after the fault until the old owner fenced itself are lost
by design (they were never sent); the report gives the loss (RPO, in
records) of every takeover. Faults are injected only from a settled
cluster whose standby holds a fresh copy: the catch-up of a standby that
just came back is another matter (``[service] max_lag``).

The benchmark is benchmarks/faults.py; tests/test_faults.py runs a short
seeded version that fails on any violation.
"""

import base64
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import time

from slaposha.cluster.keys import Keys
from slaposha.lab import LabError, wait_for
from slaposha.lab.cluster import LabCluster, Observer
from slaposha.lab.replication import (
    FS, LAB_PATHS, SNAPDIR, VOL, record_writer)

__all__ = ['FaultSuite', 'FAULTS', 'LAB_HOSTS', 'LAB_PATHS', 'RPO_BOUND']

HOSTS = ('hA', 'hB')
WITNESSES = ('hW', 'hW2', 'hW3')
LAB_HOSTS = HOSTS + WITNESSES
QUORUM = len(LAB_HOSTS) // 2 + 1

TTL = 3.0
ELECTION_TIMEOUT = 0.5  # the lab's etcd members
# An owner cut off from the majority renews its lease for as long as etcd's
# leader is cut off with it and still answers (it steps down after one to
# two election timeouts: etcd's new leader extends every lease by one, raft
# CheckQuorum; measured: a renewal sent 0.53 s after the cut was answered),
# then kills at the kill deadline, TTL - 0.2 s after that renewal was sent.
FENCE_BOUND = TTL + 2 * ELECTION_TIMEOUT + 0.5
SWITCH_WAIT = 90  # the switch command's --timeout, under the lab's 120 s
BUDGET = 15.0  # seconds a settled cluster may leave the service down

INTERVAL = 0.5  # [btrfs] interval of the service
LOOP = 0.1      # [agent] loop_interval (its default): the ticks of the cycles
CYCLE = 1.0     # longest replication cycle allowed (see above)
RPO_BOUND = max(INTERVAL, CYCLE) + LOOP + CYCLE
RECORD_EVERY = 0.02  # the writer's pause between two records

FAULTS = ('crash-owner', 'crash-standby', 'partition-owner',
          'partition-standby', 'split-owner-minority',
          'split-standby-minority', 'pause-owner-agent', 'kill-etcd-member',
          'switch')

WRITER = record_writer(VOL, RECORD_EVERY)

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = %g
    [app#writer]
    command = exec python3 -u %s %s
'''

DIVERGED = FS + '/.slaposha/diverged/' + os.path.basename(VOL)
APP_LOG = '/var/lib/slaposha/log/web.app.writer.log'


def _b64(text):
    return base64.b64encode(text.encode()).decode()


class FaultSuite(object):

    def __init__(self, lab, seed, say=print):
        self.lab = lab
        self.random = random.Random(seed)
        self.say = say
        self.marker = str(86400 + int(lab.id, 16))
        for host in HOSTS:
            device = lab.add_disk(host, '256M', label='btrfs')
            subprocess.run(['mkfs.btrfs', '-q', '-f', device], check=True,
                           stdout=subprocess.DEVNULL)
            lab.mount_disk(host, device, FS)
        writer = os.path.join(lab.workdir, 'writer.py')
        with open(writer, 'w') as f:
            f.write(WRITER)
        self.lc = LabCluster(lab, list(HOSTS), list(WITNESSES), tls=True,
                             services={'web': SERVICE % (
                                 VOL, INTERVAL, writer, self.marker)})
        self.observer = Observer(lab, self.marker, hosts=HOSTS)
        self.via = WITNESSES[0]  # a host on the majority side, to ask etcd
        self.keys = Keys('/slaposha', self.lc.name)
        self.deck = []
        self.violations = {'overlap': 0, 'minority': 0, 'absent': 0,
                           'lost write': 0, 'not kept aside': 0,
                           'stale write': 0, 'stuck switch': 0}
        self.injected = {}
        self.times = {}
        self.lost = {}  # fault: [records lost at each takeover]
        self.iterations = 0
        self.stayed = 0
        self.stale_copies = 0
        self.restarts = 0
        self.last = None  # (owner, token) after the last fault
        self.aside = None  # (old owner, its last record, records kept)
        self._events = {h: [] for h in HOSTS}
        self._read = {h: 0 for h in HOSTS}

    def start(self):
        self.lc.start()
        self.observer.start()
        self.settle()

    def stop(self):
        self.observer.stop()
        for host in HOSTS:
            self.lc.stop_agent(host)

    def save_logs(self, folder):
        """Copy every host's logs (agent or witness, etcd member, the
        writer) to ``folder``/<host>, to read after the lab is gone."""
        for host in LAB_HOSTS:
            target = os.path.join(folder, host)
            shutil.copytree(os.path.join(self.lab[host].root, 'log'),
                            target, dirs_exist_ok=True)
            state = self.lab[host].path('/var/lib/slaposha')
            if os.path.isdir(os.path.join(state, 'log')):
                shutil.copytree(os.path.join(state, 'log'),
                                os.path.join(target, 'app'),
                                dirs_exist_ok=True)
            if os.path.exists(os.path.join(state, 'etcd.log')):
                shutil.copy(os.path.join(state, 'etcd.log'), target)

    # -- helpers ---------------------------------------------------------------

    def next_fault(self):
        if not self.deck:
            self.deck = list(FAULTS)
            self.random.shuffle(self.deck)
        return self.deck.pop()

    def etcd(self, payload):
        """POST ``payload`` to etcd's /v3/kv/range with curl from inside
        ``via`` (cheap: the suite polls it), its own member first; the
        answer, or None when no member answers."""
        via = self.lab[self.via]
        urls = [via.address] + [self.lab[h].address for h in LAB_HOSTS
                                if h != self.via]
        ssl = os.path.join(self.lc.config_dir, 'ssl')
        p = via.run(['sh', '-c', 'for a in %s; do curl -sf --max-time 1'
                     ' --cacert %s/ca.crt --cert %s/%s.crt --key %s/%s.key'
                     ' -X POST -d \'%s\' https://$a:2379/v3/kv/range &&'
                     ' exit 0; done; exit 1' % (
                         ' '.join(urls), ssl, ssl, self.via, ssl, self.via,
                         json.dumps(payload))], check=False, timeout=30)
        try:
            return json.loads(p.stdout) if p.returncode == 0 else None
        except ValueError:
            return None

    def owner(self):
        """(host, token) of the owner key, or (None, None)."""
        kvs = (self.etcd({'key': _b64(self.keys.owner('web'))}) or {}).get(
            'kvs')
        if not kvs:
            return None, None
        return (base64.b64decode(kvs[0]['value']).decode(),
                int(kvs[0]['create_revision']))

    def alive(self):
        """The hosts whose agent holds a lease (announced in etcd)."""
        prefix = self.keys.hosts
        answer = self.etcd({'key': _b64(prefix), 'keys_only': True,
                            'range_end': _b64(prefix[:-1] + chr(
                                ord(prefix[-1]) + 1))}) or {}
        return [base64.b64decode(kv['key']).decode()[len(prefix):]
                for kv in answer.get('kvs') or ()]

    def inside(self, host, path):
        """Where ``path`` of ``host``'s mount namespace (its btrfs disk
        included) is seen from here: under the root of its agent."""
        return '/proc/%d/root%s' % (self.lc.agent_pid(host), path)

    def running(self):
        return self.observer.where()

    def settle(self, timeout=BUDGET, away=()):
        """Wait until exactly one host runs it and etcd agrees; not one of
        the hosts ``away`` (cut off from the majority: the owner key of a
        host cut off may outlive its service there for a moment, until the
        majority's copy of its lease expires)."""
        def one():
            where = self.running()
            if len(where) != 1 or where[0] in away:
                return None
            host, token = self.owner()
            return (host, token) if host == where[0] else None
        try:
            return wait_for(one, timeout, interval=0.1,
                            what='the service on one host')
        except LabError:
            stuck = [h for h in self.running() if h in away]
            if stuck:
                self.violation('minority', 'it runs on %s, cut off from the'
                               ' majority, %gs after the cut' % (
                                   ' and '.join(stuck), timeout))
                self.show_logs()
                return None
            members = self.healthy_members()
            if members < QUORUM:
                # No host could hold a lease: absent is what must happen.
                self.say('  not settled: only %d etcd member(s) answer, no'
                         ' quorum' % members)
                return None
            self.violation('absent', 'not settled on one host within %gs'
                           ' (running on %s, %d etcd members answer)'
                           % (timeout, self.running(), members))
            self.show_logs()
            return None

    def check_fenced(self, owner, token, cut):
        """The owner cut off from the majority (with ``cut``) must be rid of
        the service, frozen processes included, before the majority's copy
        of its lease expires (its owner key goes, another host may take it)
        and within FENCE_BOUND of the cut."""
        began = time.monotonic()
        host = self.lab[owner]
        gone = expired = None
        with_whom = ' with %s' % cut[1] if len(cut) > 1 else ''
        while time.monotonic() - began < FENCE_BOUND + 2.0:
            if expired is None:
                answer = self.etcd({'key': _b64(self.keys.owner('web'))})
                kvs = (answer or {}).get('kvs')
                if answer is not None and (not kvs or int(kvs[0][
                        'create_revision']) != token):
                    expired = time.monotonic() - began
                    # Looked at after the key was seen gone: still there
                    # means it ran once another host could take it.
                    if self.observer.running_on(host):
                        self.violation('minority', '%s still ran it when'
                                       ' the majority\'s lease of it had'
                                       ' expired, %.1f s after it was cut'
                                       ' off%s' % (owner, expired, with_whom))
            if gone is None and not self.observer.running_on(host):
                gone = time.monotonic() - began
            if gone is not None and expired is not None:
                break
            time.sleep(0.02)
        if gone is None or gone > FENCE_BOUND:
            self.violation('minority', '%s still ran it %.1f s after it was'
                           ' cut off%s' % (owner, FENCE_BOUND, with_whom))
        else:
            self.say('  %s fenced %.1f s after the cut, the majority\'s'
                     ' lease of it gone after %s' % (
                         owner, gone, '%.1f s' % expired if expired else
                         'more than %.1f s' % (FENCE_BOUND + 2.0)))

    def show_logs(self):
        for host in HOSTS:
            tail = self.lc.log(host).splitlines()[-12:]
            self.say('  last lines of the agent of %s:\n    %s'
                     % (host, '\n    '.join(tail)))

    def copy_taken(self, host):
        """When the newest copy on ``host`` was taken, or None: a receiver
        writes the meta of a snapshot once it is complete."""
        folder = self.inside(host, SNAPDIR + '/.meta')
        newest = None
        try:
            names = os.listdir(folder)
        except OSError:
            return None
        for name in names:
            try:
                with open(os.path.join(folder, name)) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if meta.get('received') and meta.get('created'):
                newest = max(newest or 0, meta['created'])
        return newest

    def wait_copy(self, standby, since, timeout=BUDGET):
        """Wait until ``standby`` holds a copy taken after ``since``: faults
        start from a cluster whose replication runs."""
        try:
            wait_for(lambda: (self.copy_taken(standby) or 0) > since,
                     timeout, interval=0.2,
                     what='a fresh copy on %s' % standby)
        except LabError:
            self.stale_copies += 1
            self.say('  note: %s holds no copy taken in the last %gs'
                     % (standby, timeout))

    def healthy_members(self):
        """How many etcd members answer, asked from a host that reaches
        the most of them."""
        best = 0
        for via in LAB_HOSTS:
            try:
                best = max(best, self.lc.query(via, '''
                    result = 0
                    for url in client.endpoints:
                        try:
                            client.status(url, timeout=1)
                            result += 1
                        except Exception:
                            pass
                '''))
            except LabError:
                continue
        return best

    def violation(self, kind, text):
        self.violations[kind] += 1
        self.say('  VIOLATION %s: %s' % (kind, text))

    def check_overlap(self):
        if self.observer.overlaps:
            t, where = self.observer.overlaps[0]
            self.violation('overlap', 'ran on %s at once (%d samples)'
                           % (' and '.join(where), len(self.observer.overlaps)))
            self.observer.overlaps[:] = []

    def check_stale(self, stale_token):
        refused = self.lc.query(self.via, '''
            from slaposha.cluster.lease import Ownership
            result = Ownership(client, keys, 'web', 'x').write(
                'audit', 'stale', token=%d)
        ''' % stale_token)
        if refused is not False:
            self.violation('stale write', 'token %d accepted' % stale_token)

    def heal_all(self):
        self.lab.heal()
        self.via = WITNESSES[0]
        for host in LAB_HOSTS:
            with open('/sys/class/net/%s/operstate' % self.lab[host].veth) \
                    as f:
                down = f.read().strip() != 'up'
            if down:
                self.lab.restart(host)
                if host in WITNESSES:
                    self.lc.start_witness(host)
                else:
                    self.lc.start_agent(host)
                    self.lc.wait_agent(host)
            elif host in HOSTS and self.lc.agents[host].poll() is not None:
                self.lc.start_agent(host)
                self.lc.wait_agent(host)

    # -- the data ------------------------------------------------------------------

    def events(self, host):
        """The writer's log of ``host`` so far: [(word, n, time)], word
        'found' (at its start) or 'ack'."""
        path = self.lab[host].path(APP_LOG)
        try:
            with open(path, 'rb') as f:
                f.seek(self._read[host])
                data = f.read()
        except OSError:
            return self._events[host]
        end = data.rfind(b'\n') + 1
        self._read[host] += end
        for line in data[:end].decode(errors='replace').splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] in ('found', 'ack'):
                try:
                    self._events[host].append(
                        (fields[0], int(fields[1]), float(fields[2])))
                except ValueError:
                    pass
        return self._events[host]

    def check_data(self, fault, old, new, lost_at):
        """The lost-write audit of one change of owner (see above)."""
        def started():
            for i, (word, n, t) in enumerate(self.events(new)):
                if word == 'found' and t > lost_at:
                    return i, n, t
            return None
        try:
            index, found, began = wait_for(started, BUDGET, interval=0.1,
                                           what='the writer started on %s'
                                           % new)
        except LabError as e:
            self.violation('lost write', '%s: no record count' % e)
            return
        # The old owner's tenure: from the last start of its writer before
        # the new owner's (which may come just after the fault).
        old_events = self.events(old)
        tenure = None
        for i, (word, n, t) in enumerate(old_events):
            if word == 'found' and t <= began and \
                    (old != new or i < index):
                tenure = i
        if tenure is None:
            self.say('  note: no writer ever started on %s' % old)
            return
        found_old = old_events[tenure][1]
        acks = []
        for word, n, t in old_events[tenure + 1:]:
            if word == 'found':
                break
            acks.append((n, t))
        if fault == 'switch':
            due = [n for n, t in acks]
        else:
            due = [n for n, t in acks if t <= lost_at - RPO_BOUND]
        required = max([found_old] + due)
        last = max([found_old] + [n for n, t in acks])
        after = len([n for n, t in acks if t > lost_at])
        lost = max(0, last - found)
        self.lost.setdefault(fault, []).append(lost)
        if lost and old != new:
            self.aside = (old, last, found)
        self.say('  data: %s found %d records; %s acknowledged %d, %d of'
                 ' them after the fault; lost %d (RPO)' % (
                     new, found, old, last, after, lost))
        try:
            with open(self.inside(new, VOL + '/records')) as f:
                text = f.read()
            problem = ''
        except OSError as e:
            text, problem = '', '%s: ' % e.strerror
        if not text.endswith('\n'):
            text = text[:text.rfind('\n') + 1]  # a record being written
        try:
            records = [int(line) for line in text.splitlines()]
        except ValueError:
            records = None
        if problem or records is None or \
                records != list(range(1, len(records) + 1)) or \
                len(records) < found:
            shown = 'unreadable' if records is None else ', '.join(
                '%d at line %d' % (n, i + 1) for i, n in enumerate(records)
                if n != i + 1)[:200]
            self.violation('lost write', '%s: %s%s/records is not the records'
                           ' 1 to N in order (%s)' % (
                               new, problem, VOL, shown or
                               'fewer than the %d found' % found))
        if found < required:
            self.violation('lost write', '%s has records 1 to %d; %d were'
                           ' acknowledged on %s more than %.1f s before the'
                           ' fault' % (new, found, required, old,
                                       0 if fault == 'switch' else RPO_BOUND))
            self.show_logs()

    def check_aside(self, host, last, kept):
        """Once ``host`` (an old owner whose records after ``kept`` were
        lost in a takeover) holds a copy of the new owner's data, its own
        volume, with every record it acknowledged (up to ``last``), must
        have been kept aside, neither deleted nor merged."""
        folder = self.inside(host, DIVERGED)
        try:
            names = sorted(os.listdir(folder), reverse=True)[:3]
        except OSError:
            names = []
        for name in names:
            try:
                with open(os.path.join(folder, name, 'records'), 'rb') as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
                    tail = f.read().split()
            except OSError:
                continue
            # A record written but not yet acknowledged may follow.
            if tail and tail[-1].isdigit() and int(tail[-1]) >= last:
                return
        self.violation('not kept aside', 'no volume kept aside on %s holds'
                       ' its records up to %d (the new owner had %d; newest'
                       ' kept aside: %s)' % (host, last, kept,
                                             ', '.join(names) or 'none'))

    # -- one iteration -------------------------------------------------------------

    def step(self):
        fault = self.next_fault()
        for attempt in range(3):
            since = time.time()
            settled = self.settle()
            if settled is None:
                self.heal_all()
                return
            if self.last is not None and self.last != settled:
                # Not a violation (it runs), but the owner should not
                # change without a fault.
                self.restarts += 1
                self.say('  note: the owner key changed since the last'
                         ' fault (%s token %d, now %s token %d)' % (
                             self.last + settled))
            self.last = settled
            owner, token = settled
            standby = 'hB' if owner == 'hA' else 'hA'
            self.wait_copy(standby, since)
            try:
                wait_for(lambda: standby in self.alive(), BUDGET,
                         interval=0.2, what='the agent of %s holding a'
                         ' lease' % standby)
            except LabError as e:
                self.say('  note: %s' % e)
            if self.owner() == settled:
                break
        if self.aside is not None and self.aside[0] == standby:
            self.check_aside(*self.aside)
        self.aside = None
        self.say('%3d %-22s owner %s token %d' % (self.iterations + 1, fault,
                                                  owner, token))
        self.injected[fault] = self.injected.get(fault, 0) + 1
        began = time.monotonic()
        lost_at = time.time()
        moved = True
        cut = None  # the hosts cut off from the majority
        if fault == 'crash-owner':
            self.lab.crash(owner)
        elif fault == 'crash-standby':
            self.lab.crash(standby)
            moved = False
        elif fault in ('partition-owner', 'partition-standby'):
            cut = [owner if fault == 'partition-owner' else standby]
        elif fault in ('split-owner-minority', 'split-standby-minority'):
            witness = self.random.choice(WITNESSES)
            self.via = [w for w in WITNESSES if w != witness][0]
            cut = [owner if fault == 'split-owner-minority' else standby,
                   witness]
        elif fault == 'pause-owner-agent':
            pid = self.lc.agent_pid(owner)
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(TTL + 1.0)
                if self.observer.running_on(self.lab[owner]):
                    self.violation('minority', 'the frozen agent\'s service'
                                   ' still runs on %s' % owner)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif fault == 'kill-etcd-member':
            victim = self.random.choice(LAB_HOSTS)
            pid = self.lc.etcd_pid(victim)
            if pid:
                os.kill(pid, signal.SIGKILL)
            moved = None
        elif fault == 'switch':
            p = self.lc.cli(standby, 'switch', 'web', '--to', standby,
                            '--timeout', str(SWITCH_WAIT), check=False)
            if p.returncode and 'not done after' in p.stderr:
                self.violation('stuck switch', p.stderr.strip())
                moved = None
            elif p.returncode:
                self.say('  note: switch refused: %s' % p.stderr.strip())
                moved = False
        if cut is not None:
            self.lab.partition(cut)
            moved = owner in cut
            if moved:
                self.check_fenced(owner, token, cut)
        result = self.settle(away=cut if moved and cut else ())
        if result is not None:
            new_owner, new_token = result
            if new_owner != owner:
                self.times.setdefault(fault, []).append(
                    time.monotonic() - began)
                self.check_stale(token)
            if cut is not None and new_owner in cut:
                self.violation('minority', 'it runs on %s, cut off from the'
                               ' majority' % new_owner)
            elif new_owner == owner and moved:
                # Not a violation (the service runs), but worth a look.
                self.stayed += 1
                self.say('  note: back on %s after %s' % (owner, fault))
            if new_token != token:
                self.check_data(fault, owner, new_owner, lost_at)
        self.last = result
        self.check_overlap()
        self.heal_all()
        self.iterations += 1

    def report(self):
        lines = ['', 'fault | injected | takeovers | median (s) | p99 (s) |'
                 ' max (s) | RPO records: median | max']
        for fault in FAULTS:
            t = sorted(self.times.get(fault, []))
            lost = sorted(self.lost.get(fault, []))
            rpo = '%d | %d' % (statistics.median(lost), lost[-1]) if lost \
                else '- | -'
            if not t:
                lines.append('%s | %d | 0 | - | - | - | %s' % (
                    fault, self.injected.get(fault, 0), rpo))
                continue
            p99 = t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))]
            lines.append('%s | %d | %d | %.2f | %.2f | %.2f | %s' % (
                fault, self.injected.get(fault, 0), len(t),
                statistics.median(t), p99, t[-1], rpo))
        lines.append('')
        lines.append('violations: %s; iterations: %d; faults after which the'
                     ' service ended on the same host: %d; owner changes'
                     ' between faults: %d; standby copies not fresh before a'
                     ' fault: %d; lost-write bound %.1f s' % (
                         ', '.join('%s %d' % kv for kv in
                                   self.violations.items()),
                         self.iterations, self.stayed, self.restarts,
                         self.stale_copies, RPO_BOUND))
        return '\n'.join(lines)
