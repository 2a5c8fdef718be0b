"""The host's own systemd units that a node's service replaces.

A SlapOS node that uses re6st runs the package's ``re6stnet.service`` on
its host. Once the node is a service, the agent runs the node's re6st
daemon wherever the node runs (the ``re6st`` resource): the host's own
unit must be stopped and disabled there, or two daemons hold the same
identity (the same tunnels, the same address). ``slaposha slapos adopt``
does it and records the unit's state before; ``slaposha slapos release``
enables and starts it again where the node is released.

Hosts without systemd (no ``/run/systemd/system``, as ``sd_booted()``
tests it) or without the unit have nothing to do.
"""

import os
import shutil
import subprocess

__all__ = ['RE6ST_UNIT', 'Units', 'UnitError']

RE6ST_UNIT = 're6stnet.service'
# What `systemctl is-enabled` says of a unit that will not start at boot.
OFF = ('disabled', 'masked', 'masked-runtime')


class UnitError(Exception):
    """A systemctl command that failed, as one line."""


class Units(object):
    """systemctl on this host; ``systemctl``: its path (default: found in
    PATH on a host booted with systemd, else None: no units here)."""

    def __init__(self, systemctl=None):
        if systemctl is None and os.path.isdir('/run/systemd/system'):
            systemctl = shutil.which('systemctl')
        self.systemctl = systemctl

    def _run(self, *args):
        try:
            return subprocess.run([self.systemctl] + list(args),
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UnitError('systemctl %s: %s' % (' '.join(args), e))

    def state(self, unit):
        """(enabled, active) as systemctl says them ('enabled', 'active'),
        or None: no systemd here, or no such unit."""
        if not self.systemctl:
            return None
        enabled = self._run('is-enabled', unit).stdout.strip()
        if not enabled or enabled == 'not-found':
            return None
        return enabled, self._run('is-active', unit).stdout.strip()

    def _change(self, *args):
        p = self._run(*args)
        if p.returncode:
            raise UnitError('systemctl %s: %s' % (' '.join(args), (
                p.stderr.strip() or 'exit code %d' % p.returncode)
                .splitlines()[-1][:300]))

    def disable(self, unit):
        """Stop the unit and keep it from starting at boot."""
        self._change('disable', '--now', unit)

    def enable(self, unit, now=True):
        """Start the unit at boot (and now)."""
        self._change('enable', *(('--now', unit) if now else (unit,)))
