"""``slaposha slapos adopt | prepare-standby | release``: a SlapOS node put
under the cluster's care, its peers made ready, and the node given back
(:mod:`slaposha.slapos.adopt`, :mod:`slaposha.slapos.standby`).

Each prints what it would do; ``--apply`` does it. Every step is
idempotent: a run cut short is run again.
"""

import sys

from slaposha.cli.commands import (
    HOST_ARG, SLAPOS_CFG, UserError, agent_call, cluster_of, command,
    local_host, read_reference)

_APPLY = (('--apply',), dict(action='store_true',
                             help='do it (without: print what it would do)'))
_CRON = (('--cron-dir',), dict(metavar='DIR', default='/etc/cron.d',
                               help='the system cron folder (default'
                               ' /etc/cron.d)'))


def _say(lines):
    for line in lines:
        print(line)
    sys.stdout.flush()


@command('slapos adopt', 'put this host\'s SlapOS node under the cluster\'s'
         ' care: print the plan (what moves, what each peer must have, what'
         ' changes here); --apply does it', [
             SLAPOS_CFG, HOST_ARG, _APPLY, _CRON,
             (('--service',), dict(metavar='NAME', help='the service\'s name'
                                   ' (default: the computer id, lower'
                                   ' case)')),
             (('--hosts',), dict(nargs='+', metavar='HOST', help='where it'
                                 ' may run, preferred first (default: this'
                                 ' host, then the other cluster hosts)')),
             (('--convert',), dict(action='store_true', help='with the'
                                   ' node\'s programs stopped, move'
                                   ' instance_root into a new btrfs'
                                   ' subvolume at the same path')),
         ])
def slapos_adopt(args):
    from slaposha.slapos.adopt import Adoption, AdoptError
    cluster = cluster_of(args)
    host = local_host(args, cluster, cluster.cluster.hosts, 'hosts')
    try:
        adoption = Adoption(args.slapos_cfg, cluster, host, args.service,
                            args.hosts, cron_dir=args.cron_dir)
        if not args.apply:
            _say(adoption.plan(args.convert))
            print('\n(nothing changed: --apply does it)')
            return 0
        done = adoption.apply(args.convert)
    except AdoptError as e:
        raise UserError(str(e))
    except OSError as e:
        raise UserError('%s: %s' % (getattr(e, 'filename', '') or 'adopt',
                                    e.strerror or e))
    _say(['- ' + line for line in done] or ['nothing to do: adopted already'])
    print('adopted %s as service %s; next, on each peer: `slaposha slapos'
          ' fingerprint` from here into `slaposha slapos prepare-standby'
          ' --reference FILE --apply` there, then the agents'
          % (adoption.node.computer_id, adoption.name))
    return 0


@command('slapos prepare-standby', 'make this host ready to take over the'
         ' node of a fingerprint (users and groups with the same ids,'
         ' paths, no slapgrid from cron); say what it cannot do itself', [
             SLAPOS_CFG, _APPLY, _CRON,
             (('--reference',), dict(metavar='FILE', required=True,
                                     help='the owner\'s fingerprint (`slaposha'
                                     ' slapos fingerprint` there), - for'
                                     ' stdin')),
         ])
def slapos_prepare_standby(args):
    from slaposha.slapos.standby import Preparation, PrepareError
    ref = read_reference(args.reference)
    try:
        prep = Preparation(ref, args.slapos_cfg, cron_dir=args.cron_dir)
        if not args.apply:
            _say(prep.lines())
            print('\n(nothing changed: --apply does it)')
            return 0
        done = prep.apply()
    except PrepareError as e:
        raise UserError(str(e))
    except OSError as e:
        raise UserError('%s: %s' % (getattr(e, 'filename', '') or
                                    'prepare-standby', e.strerror or e))
    _say(['- done: ' + line for line in done])
    _say(['- cannot do here: ' + line for line in prep.cannot])
    left = prep.check()
    releases = [p for p in left if p.startswith('software release ')]
    for line in left:
        print('- check: %s' % line)
    if releases and len(releases) == len(left) and not prep.cannot:
        print('ready, but for %d software release(s): the owner\'s agent'
              ' copies them once the service runs' % len(releases))
        return 0
    if left or prep.cannot:
        return 1
    print('ready: `slaposha slapos check` passes')
    return 0


@command('slapos release', 'give the adopted node back to SlapOS on this'
         ' host, the service stopped: frozen in the cluster, cron back,'
         ' started as SlapOS starts it, no data moved', [
             SLAPOS_CFG, HOST_ARG, _APPLY, _CRON,
             (('--no-start',), dict(action='store_true', help='leave the'
                                    ' node stopped')),
             (('--timeout',), dict(type=float, default=600.0, metavar='S',
                                   help='time allowed to each SlapOS command'
                                   ' that starts the node (default 600)')),
         ])
def slapos_release(args):
    from slaposha.api.local import AgentUnreachable
    from slaposha.slapos.adopt import AdoptError
    from slaposha.slapos.release import release
    cluster = cluster_of(args)
    host = local_host(args, cluster, cluster.cluster.hosts, 'hosts')

    def ask(method, route, body):
        return agent_call(args, method, route, body)
    try:
        ask('GET', '/local', None)
    except (UserError, AgentUnreachable):
        ask = None  # no agent here: release says what that means
    try:
        lines = release(args.slapos_cfg, cluster, host,
                        ask, apply=args.apply, start=not args.no_start,
                        cron_dir=args.cron_dir, timeout=args.timeout)
    except AdoptError as e:
        raise UserError(str(e))
    except OSError as e:
        raise UserError('%s: %s' % (getattr(e, 'filename', '') or 'release',
                                    e.strerror or e))
    if not args.apply:
        _say(lines)
        print('\n(nothing changed: --apply does it)')
        return 0
    _say(['- ' + line for line in lines])
    print('released: a plain SlapOS node on %s' % host)
    return 0
