"""The watchdog: fences a host's services when its agent stops renewing.

The agent suspends its services itself at the self-fence deadline and kills
them at the kill deadline (DESIGN.md 2). A frozen agent (SIGSTOP, a stuck
disk, a deadlock) cannot: for that, each agent starts this small separate
process and pets it with every good lease renewal. Each pet carries the
kill deadline (CLOCK_MONOTONIC seconds, the same clock in every process of
the machine; still before etcd can expire the lease), the cgroups of the
services it owns and the addresses they hold. Frozen or not, the processes
die: SIGKILL through cgroup.kill reaches frozen ones. When a deadline passes without a newer pet, the
watchdog kills those cgroups and drops those addresses. When the agent dies,
the watchdog still fences at the last deadline, then exits.

Protocol: one JSON object per line on the watchdog's stdin::

    {"deadline": 1234.5, "cgroups": ["/sys/fs/cgroup/..."],
     "addresses": [["10.0.0.5/32", "eth0"]]}

``"deadline": null`` disarms (the agent owns nothing, or stopped it all).
The watchdog never opens /dev/watchdog: in a lab that would reboot the
whole machine.
"""

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

from slaposha.cgroup import Cgroup

__all__ = ['Watchdog', 'main']


class Watchdog(object):
    """The agent's side: start the watchdog process and pet it."""

    def __init__(self, log=None):
        self.log = log
        self.proc = None
        self._lock = threading.Lock()  # the lease thread and the loop pet

    def start(self):
        # The agent's own sys.path: a buildout script (a software release's
        # bin/slaposha) sets it in the script, not in the interpreter.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'slaposha.watchdog'],
            stdin=subprocess.PIPE, stdout=self.log, stderr=self.log,
            close_fds=True, env=env)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def _send(self, message):
        if not self.alive():
            return False
        line = (json.dumps(message) + '\n').encode()
        with self._lock:
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def arm(self, deadline, cgroups=(), addresses=()):
        """Fence ``cgroups`` and ``addresses`` at ``deadline`` unless armed
        again before it. A watchdog that died is started again first: the
        agent runs without its guard at most until the next renewal."""
        if self.proc is not None and not self.alive():
            with self._lock:
                if not self.alive():
                    code = self.proc.returncode
                    self.start()
                    logging.getLogger('slaposha.agent').warning(
                        'watchdog exited (code %s): started again, pid %d',
                        code, self.proc.pid)
        return self._send({'deadline': deadline, 'cgroups': list(cgroups),
                           'addresses': [list(a) for a in addresses]})

    def disarm(self):
        return self._send({'deadline': None})

    def stop(self):
        """Disarm and let the watchdog exit (a clean agent shutdown)."""
        if self.proc is None:
            return
        self.disarm()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _say(text):
    sys.stderr.write('%s watchdog[%d]: %s\n' % (
        time.strftime('%Y-%m-%d %H:%M:%S'), os.getpid(), text))
    sys.stderr.flush()


def fence(cgroups, addresses):
    """Kill the cgroups and drop the addresses; returns what was done."""
    killed = 0
    for path in cgroups:
        try:
            killed += Cgroup(path).kill()
        except Exception as e:  # fence the rest whatever happens
            _say('could not kill cgroup %s: %s' % (path, e))
    dropped = []
    for address, device in addresses:
        p = subprocess.run(['ip', 'addr', 'del', address, 'dev', device],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if p.returncode == 0:
            dropped.append(address)
    return killed, dropped


def main():
    fd = sys.stdin.fileno()
    buffered = b''
    armed = None
    eof = False
    while True:
        timeout = None
        if armed is not None:
            timeout = max(0.0, armed['deadline'] - time.monotonic())
        elif eof:
            return 0
        if not eof:
            ready, _, _ = select.select([fd], [], [], timeout)
        else:
            time.sleep(timeout)
            ready = []
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                eof = True
                if armed is not None:
                    _say('agent gone: fencing at its last deadline')
            buffered += chunk
            while b'\n' in buffered:
                line, buffered = buffered.split(b'\n', 1)
                try:
                    message = json.loads(line.decode())
                    deadline = message['deadline']
                    armed = None if deadline is None else {
                        'deadline': float(deadline),
                        'cgroups': [str(c) for c in
                                    message.get('cgroups', [])],
                        'addresses': [(str(a), str(d)) for a, d in
                                      message.get('addresses', [])]}
                except (ValueError, KeyError, TypeError) as e:
                    _say('ignored a malformed message from the agent: %s'
                         % e)
        if armed is not None and time.monotonic() >= armed['deadline']:
            late = time.monotonic() - armed['deadline']
            killed, dropped = fence(armed['cgroups'], armed['addresses'])
            _say('deadline passed %.0f ms ago with no renewal from the agent:'
                 ' killed %d process(es) of %s, dropped %s' % (
                     late * 1000, killed,
                     ', '.join(armed['cgroups']) or 'no cgroup',
                     ', '.join(dropped) or 'no address'))
            armed = None


if __name__ == '__main__':
    sys.exit(main())
