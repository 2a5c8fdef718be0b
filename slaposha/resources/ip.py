"""``ip``: service addresses that move with the service.

The addresses (and optional routes through gateways) are added to ``dev`` on
the host that runs the service, and dropped from it when the service stops,
is fenced, or when the watchdog fences on the agent's behalf (it runs
``ip addr del ADDRESS dev DEV`` with what :meth:`Ip.fence_targets` gives).
The agent runs inside the host's network namespace, so plain ``ip``
commands act on the right interfaces.

Two traps found when moving a SlapOS node by hand
(reference/slapos-lab-takeover.md, section 5):

- IPv6 duplicate address detection leaves a new address *tentative* for
  about 1.3 s, and a program that binds it meanwhile fails with
  EADDRNOTAVAIL: the partitions started right after would die. IPv6
  addresses are therefore added with ``nodad``. The ownership protocol
  (one lease holder; a deposed owner drops its addresses before its lease
  can expire) is what keeps two hosts from holding an address; for a
  belt-and-braces check, ``check_conflict = true`` probes the segment
  first and refuses to start when another host answers for the address.
- Neighbours keep sending to the old owner's MAC for up to about 40 s after
  a move. With ``announce = true`` (the default) start sends a gratuitous
  ARP per IPv4 and an unsolicited neighbour advertisement per IPv6 address
  (see :mod:`slaposha.resources.announce`), ``announce_count`` times 100 ms
  apart, and they switch at once.

``routes`` lists routes that go with the addresses, one per line (or
separated by commas), each ``DESTINATION via GATEWAY``, where DESTINATION is
a network (``10.9.0.0/16``, ``fd00:9::/64``) or ``default``::

    [ip#public]
    address = 10.213.0.100/32 fd42:213::100/128
    dev = lab0
    routes = 10.9.0.0/16 via 10.213.0.254
             fd00:9::/64 via fd42:213::fe

They are set with ``ip route replace ... dev DEV`` (a route to the same
destination is replaced by ours) and deleted on stop, before the addresses.
"""

import ipaddress
import json
import subprocess

from slaposha.schema import REQUIRED, Key
from slaposha.inputs import one_line
from slaposha.resources import (
    DOWN, UP, WARN, Resource, ResourceError, Status, announce, register)

ANNOUNCE_INTERVAL = 0.1  # seconds between two rounds of announcements
CONFLICT_TIMEOUT = 0.2   # seconds to wait for an answer to a probe


class IpError(Exception):
    """``ip`` could not run or did not answer in time, as one line."""


def run_ip(args, commands=None, timeout=10):
    """``ip ARGS`` within ``timeout`` seconds, ``commands`` on its stdin
    (for ``-batch -``): the CompletedProcess (text), whatever its exit
    code; IpError when ip cannot run or does not answer in time."""
    try:
        return subprocess.run(
            ['ip'] + args, input=commands, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True,
            stdin=subprocess.DEVNULL if commands is None else None,
            timeout=timeout)
    except subprocess.TimeoutExpired:
        raise IpError('ip did not answer within %g s' % timeout)
    except OSError as e:
        raise IpError('cannot run ip: %s' % (e.strerror or e))


def parse_routes(text):
    """``DEST via GW`` entries, one per line or comma-separated, as a list
    of (network or 'default', gateway address); ValueError names the bad
    entry."""
    routes = []
    for entry in (text or '').replace(',', '\n').splitlines():
        words = entry.split()
        if not words:
            continue
        if len(words) != 3 or words[1] != 'via':
            raise ValueError('expected "DESTINATION via GATEWAY" (got %r)'
                             % entry.strip())
        try:
            gateway = ipaddress.ip_address(words[2])
        except ValueError:
            raise ValueError('gateway %r is not an address (in %r)'
                             % (words[2], entry.strip()))
        if words[0] == 'default':
            destination = 'default'
        else:
            try:
                destination = ipaddress.ip_network(words[0])
            except ValueError as e:
                raise ValueError('destination %r is not a network: %s'
                                 % (words[0], e))
            if destination.version != gateway.version:
                raise ValueError('%s and its gateway %s are not of the same'
                                 ' IP version' % (destination, gateway))
        routes.append((destination, gateway))
    return routes



@register
class Ip(Resource):
    """service addresses on an interface, announced to the neighbours"""

    kind = 'ip'
    keys = (
        Key('address', 'words', REQUIRED, 'the addresses with their prefix,'
            ' e.g. 10.0.0.5/32 2001:db8::5/128'),
        Key('dev', 'name', REQUIRED, 'interface that carries them'),
        Key('routes', 'string', None, 'routes set with the addresses, one'
            ' "DESTINATION via GATEWAY" per line; DESTINATION a network or'
            ' default'),
        Key('announce', 'boolean', True, 'after adding them, send a'
            ' gratuitous ARP per IPv4 and an unsolicited neighbour'
            ' advertisement per IPv6 address, so that neighbours switch to'
            ' this host at once rather than in about 40 s'),
        Key('announce_count', 'integer', 2, 'rounds of announcements, 100 ms'
            ' apart', minimum=1, maximum=10),
        Key('check_conflict', 'boolean', False, 'refuse to start when another'
            ' host of the segment answers for an address (ARP probe,'
            ' neighbour solicitation; adds 0.2 s to start)'),
    )

    @classmethod
    def validate(cls, section):
        if not section.address:
            return 'address: needs at least one address'
        for text in section.address:
            try:
                ipaddress.ip_interface(text)
            except ValueError:
                return ('address: %r is not an address with an optional'
                        ' prefix, such as 10.0.0.5/32 or 2001:db8::5/128'
                        % text)
        try:
            parse_routes(section.routes)
        except ValueError as e:
            return 'routes: %s' % e
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.dev = section.dev
        self.addresses = [ipaddress.ip_interface(a) for a in section.address]
        self.routes = parse_routes(section.routes)

    # -- commands ------------------------------------------------------------

    def _run(self, args, what):
        try:
            return run_ip(args)
        except IpError as e:
            raise ResourceError('%s: cannot %s: %s' % (self.rid, what, e))

    def _ip(self, args, what, ok=()):
        """Run ``ip ARGS``; ResourceError with its stderr on failure, unless
        the stderr contains one of ``ok`` (an expected, harmless state).
        Returns stdout."""
        p = self._run(args, what)
        if p.returncode and not any(s in p.stderr for s in ok):
            raise ResourceError('%s: cannot %s: %s' % (
                self.rid, what, one_line(p.stderr) or 'exit %d' % p.returncode))
        return p.stdout

    def _present(self):
        """The addresses on dev, as ip_interface objects; None when dev does
        not exist."""
        what = 'list the addresses of %s' % self.dev
        p = self._run(['-j', 'addr', 'show', 'dev', self.dev], what)
        if p.returncode:
            if 'does not exist' in p.stderr:
                return None
            raise ResourceError('%s: cannot %s: %s' % (
                self.rid, what, one_line(p.stderr) or 'exit %d' % p.returncode))
        present = set()
        for link in json.loads(p.stdout or '[]'):
            for info in link.get('addr_info', []):
                if info.get('dadfailed'):
                    continue  # on the interface, but not usable
                present.add(ipaddress.ip_interface('%s/%s' % (
                    info['local'], info['prefixlen'])))
        return present

    @staticmethod
    def _family(version):
        return '-4' if version == 4 else '-6'

    def _route_args(self, destination, gateway):
        dest = 'default' if destination == 'default' else str(destination)
        return [self._family(gateway.version), 'route', '%s', dest, 'via',
                str(gateway), 'dev', self.dev]

    # -- verbs ---------------------------------------------------------------

    def start(self):
        self._up(self.conf.check_conflict)

    def suspend(self):
        """Addresses dropped: no client reaches the frozen service."""
        self.fence()

    def resume(self):
        """Addresses back and announced; no conflict check: the lease held
        all along, nobody else may have taken them."""
        self._up(check_conflict=False)

    def _up(self, check_conflict):
        present = self._present()
        if present is None:
            raise ResourceError('%s: device %s does not exist'
                                % (self.rid, self.dev))
        missing = [a for a in self.addresses if a not in present]
        if check_conflict and missing:
            self._check_conflict(missing)
        for a in missing:
            args = ['addr', 'add', str(a), 'dev', self.dev]
            if a.version == 6:
                # No DAD: the address is usable at once (see the docstring).
                args.append('nodad')
            self._ip(args, 'add %s to %s' % (a, self.dev), ok=('File exists',))
        for destination, gateway in self.routes:
            args = self._route_args(destination, gateway)
            args[2] = 'replace'
            self._ip(args, 'set route %s via %s' % (destination, gateway))
        if self.conf.announce:
            try:
                announce.announce(self.dev, self.addresses,
                                  count=self.conf.announce_count,
                                  interval=ANNOUNCE_INTERVAL)
            except OSError as e:
                raise ResourceError('%s: cannot announce the addresses on %s:'
                                    ' %s' % (self.rid, self.dev,
                                             e.strerror or e))

    def _check_conflict(self, missing):
        try:
            found = announce.conflicts(self.dev, missing,
                                       timeout=CONFLICT_TIMEOUT)
        except OSError as e:
            raise ResourceError('%s: cannot probe the segment of %s for'
                                ' conflicts: %s' % (self.rid, self.dev,
                                                    e.strerror or e))
        if found:
            raise ResourceError('%s: refusing to start: %s already answered'
                                ' on %s (check_conflict)' % (
                                    self.rid, ', '.join(
                                        '%s by %s' % kv for kv in
                                        sorted(found.items())), self.dev))

    def stop(self):
        for destination, gateway in self.routes:
            args = self._route_args(destination, gateway)
            args[2] = 'del'
            self._ip(args, 'delete route %s via %s' % (destination, gateway),
                     ok=('No such process', 'Cannot find device'))
        present = self._present()
        if present is None:
            return  # no device, no address left on it
        for a in self.addresses:
            if a in present:
                self._ip(['addr', 'del', str(a), 'dev', self.dev],
                         'delete %s from %s' % (a, self.dev),
                         ok=('Cannot assign requested address',))

    def fence(self):
        """Drop the addresses in one ``ip`` run; -force goes on past an
        address that is already gone. Routes stay: without the addresses
        they do not make this host answer for the service."""
        batch = ''.join('addr del %s dev %s\n' % (a, self.dev)
                        for a in self.addresses)
        subprocess.run(['ip', '-force', '-batch', '-'], input=batch,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       universal_newlines=True, timeout=10)

    def fence_targets(self):
        return [], [(str(a), self.dev) for a in self.addresses]

    def status(self):
        present = self._present()
        if present is None:
            return Status(DOWN, 'device %s does not exist' % self.dev)
        missing = [str(a) for a in self.addresses if a not in present]
        if len(missing) == len(self.addresses):
            return Status(DOWN, 'not on %s' % self.dev)
        if missing:
            return Status(WARN, 'missing on %s: %s' % (
                self.dev, ' '.join(missing)))
        lost = self._missing_routes()
        if lost:
            return Status(WARN, 'addresses on %s, but no route %s' % (
                self.dev, ', '.join(lost)))
        return Status(UP, 'on %s' % self.dev)

    def _missing_routes(self):
        lost = []
        for destination, gateway in self.routes:
            dest = 'default' if destination == 'default' else str(destination)
            out = self._ip([self._family(gateway.version), '-j', 'route',
                            'show', 'exact', dest], 'list routes')
            if not any(r.get('gateway') == str(gateway) and
                       r.get('dev') == self.dev
                       for r in json.loads(out or '[]')):
                lost.append('%s via %s' % (dest, gateway))
        return lost
