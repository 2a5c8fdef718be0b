"""A seeded random sequence of faults with audits after every step, as
Pacemaker's cluster test suite does (issue: the demo, benchmarks and a
randomized fault suite).

Lab: hA and hB run the agents (a service `web` that may run on both), hW is
the witness. An observer outside every host polls every 20 ms where the
service's process runs. Each iteration injects one fault, waits for the
cluster to settle, checks the audits, then heals everything.

Faults: crash of the owner's host, crash of the standby's host, partition
of the owner alone, partition of the standby alone, pause of the owner's
agent past the lease, SIGKILL of a random etcd member, planned switch.

Audits (each violation is counted and printed):
- overlap: the service seen running on two hosts at once;
- minority: the owner cut off from the majority still running it TTL
  seconds after the cut (it must fence itself by its deadline);
- absent: no host runs it longer than the budget while a quorate host that
  may run it exists;
- stale write: a write under the previous owner's token is accepted.

The benchmark is benchmarks/faults.py; tests/test_faults.py runs a short
seeded version that fails on any violation.
"""

import os
import random
import signal
import statistics
import time

from slaposha.lab import LabError, wait_for
from slaposha.lab.cluster import LabCluster, Observer

TTL = 3.0
BUDGET = 15.0  # seconds a settled cluster may leave the service down

FAULTS = ('crash-owner', 'crash-standby', 'partition-owner',
          'partition-standby', 'pause-owner-agent', 'kill-etcd-member',
          'switch')


class FaultSuite(object):

    def __init__(self, lab, seed, say=print):
        self.lab = lab
        self.random = random.Random(seed)
        self.say = say
        self.marker = str(86400 + int(lab.id, 16))
        self.lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
            [service]
            hosts = hA hB
            [app#main]
            command = exec sleep %s
        ''' % self.marker})
        self.observer = Observer(lab, self.marker)
        self.violations = {'overlap': 0, 'minority': 0, 'absent': 0,
                           'stale write': 0}
        self.times = {}
        self.iterations = 0
        self.stayed = 0

    def start(self):
        self.lc.start()
        self.observer.start()
        self.settle()

    def stop(self):
        self.observer.stop()
        for host in ('hA', 'hB'):
            self.lc.stop_agent(host)

    # -- helpers ---------------------------------------------------------------

    def owner(self):
        return self.lc.owner('web', 'hW')

    def running(self):
        return self.observer.where()

    def settle(self, timeout=BUDGET):
        """Wait until exactly one host runs it and etcd agrees."""
        def one():
            where = self.running()
            if len(where) != 1:
                return None
            host, token = self.owner()
            return (host, token) if host == where[0] else None
        try:
            return wait_for(one, timeout, interval=0.1,
                            what='the service on one host')
        except LabError:
            members = self.healthy_members()
            if members < 2:
                # No host could hold a lease: absent is what must happen.
                self.say('  not settled: only %d etcd member(s) answer, no'
                         ' quorum' % members)
                return None
            self.violation('absent', 'not settled on one host within %gs'
                           ' (running on %s, %d etcd members answer)'
                           % (timeout, self.running(), members))
            for host in ('hA', 'hB'):
                tail = self.lc.log(host).splitlines()[-12:]
                self.say('  last lines of the agent of %s:\n    %s'
                         % (host, '\n    '.join(tail)))
            return None

    def healthy_members(self):
        """How many etcd members answer, asked from a host that reaches
        the most of them."""
        best = 0
        for via in ('hW', 'hA', 'hB'):
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
        refused = self.lc.query('hW', '''
            from slaposha.cluster.lease import Ownership
            result = Ownership(client, keys, 'web', 'x').write(
                'audit', 'stale', token=%d)
        ''' % stale_token)
        if refused is not False:
            self.violation('stale write', 'token %d accepted' % stale_token)

    def heal_all(self):
        self.lab.heal()
        for host in ('hA', 'hB', 'hW'):
            with open('/sys/class/net/%s/operstate' % self.lab[host].veth) \
                    as f:
                down = f.read().strip() != 'up'
            if down:
                self.lab.restart(host)
                if host == 'hW':
                    self.lc.start_witness(host)
                else:
                    self.lc.start_agent(host)
                    self.lc.wait_agent(host)
            elif host != 'hW' and self.lc.agents[host].poll() is not None:
                self.lc.start_agent(host)
                self.lc.wait_agent(host)

    # -- one iteration -------------------------------------------------------------

    def step(self):
        fault = self.random.choice(FAULTS)
        settled = self.settle()
        if settled is None:
            self.heal_all()
            return
        owner, token = settled
        standby = 'hB' if owner == 'hA' else 'hA'
        self.say('%3d %-18s owner %s token %d' % (self.iterations + 1, fault,
                                                  owner, token))
        began = time.monotonic()
        moved = True
        if fault == 'crash-owner':
            self.lab.crash(owner)
        elif fault == 'crash-standby':
            self.lab.crash(standby)
            moved = False
        elif fault == 'partition-owner':
            self.lab.partition([owner])
            time.sleep(TTL + 0.5)
            if self.observer.running_on(self.lab[owner]):
                self.violation('minority', '%s still runs it %.1f s after'
                               ' it was cut off' % (owner, TTL + 0.5))
        elif fault == 'partition-standby':
            self.lab.partition([standby])
            moved = False
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
            victim = self.random.choice(['hA', 'hB', 'hW'])
            pid = self.lc.etcd_pid(victim)
            if pid:
                os.kill(pid, signal.SIGKILL)
            moved = None
        elif fault == 'switch':
            p = self.lc.cli(standby, 'switch', 'web', '--to', standby,
                            check=False)
            if p.returncode:
                self.say('  note: switch refused: %s' % p.stderr.strip())
                moved = False
        result = self.settle()
        if result is not None:
            new_owner, new_token = result
            if new_owner != owner:
                self.times.setdefault(fault, []).append(
                    time.monotonic() - began)
                self.check_stale(token)
            elif moved:
                # Not a violation (the service runs), but worth a look.
                self.stayed += 1
                self.say('  note: back on %s after %s' % (owner, fault))
        self.check_overlap()
        self.heal_all()
        self.iterations += 1

    def report(self):
        lines = ['', 'fault | takeovers | median (s) | p99 (s) | max (s)']
        for fault in FAULTS:
            t = sorted(self.times.get(fault, []))
            if not t:
                lines.append('%s | 0 | - | - | -' % fault)
                continue
            p99 = t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))]
            lines.append('%s | %d | %.2f | %.2f | %.2f' % (
                fault, len(t), statistics.median(t), p99, t[-1]))
        lines.append('')
        lines.append('violations: %s; iterations: %d; faults after which the'
                     ' service ended on the same host: %d' % (', '.join(
                         '%s %d' % kv for kv in self.violations.items()),
                         self.iterations, self.stayed))
        return '\n'.join(lines)
