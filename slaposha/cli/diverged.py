"""``slaposha data diverged list | drop``: the diverged copies kept on this
host (data an old owner wrote that the new owner's copy lacks, set aside
by the btrfs and rsync drivers; :mod:`slaposha.replication.diverged`).

They are on this host's disks, so the commands read and delete them here,
without the agent; ``slaposha status`` shows those of every host."""

import json
import sys
import time

from slaposha import config
from slaposha.cli.commands import UserError, cluster_of, command
from slaposha.replication import ReplicationError, human_bytes

__all__ = []

ENGINES = ('btrfs', 'rsync')


def _engine(section):
    if section.kind == 'btrfs':
        from slaposha.replication.volume import Volume
        return Volume(section.volume)
    from slaposha.replication.tree import Tree
    return Tree(section.path, section.store)


def _data(args):
    """[(service name, resource id, engine)] of the services (or
    ``args.service``) whose data a driver copies between hosts."""
    services = config.load_services(cluster_of(args))
    if args.service and args.service not in [s.name for s in services]:
        raise UserError('no service %r (the services: %s)' % (
            args.service, ' '.join(s.name for s in services) or 'none'))
    found = []
    for service in services:
        if args.service and service.name != args.service:
            continue
        for section in service.resources:
            if section.kind in ENGINES:
                try:
                    found.append((service.name, section.rid,
                                  _engine(section)))
                except ReplicationError as e:
                    raise UserError(str(e))
    return found


def _line(service, rid, copy):
    return '%-10s %-14s %-32s %s  token %-6s %9s  %s' % (
        service, rid, copy['id'],
        time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(copy['at'])),
        copy.get('token') if copy.get('token') is not None else '?',
        human_bytes(copy['size']) if copy.get('size') is not None else '?',
        copy.get('reason', ''))


@command('data diverged list', 'the diverged copies kept on this host: data'
         ' an old owner wrote that the new owner\'s copy does not have', [
             (('service',), dict(nargs='?', metavar='SERVICE',
                                 help='only this service')),
             (('--json',), dict(action='store_true',
                                help='as JSON: [{service, rid, id, path, at,'
                                ' token, size, reason}]')),
         ])
def diverged_list(args):
    listed = []
    for service, rid, engine in _data(args):
        try:
            copies = engine.diverged()
        except (ReplicationError, OSError) as e:
            print('%s %s: cannot list the diverged copies: %s' % (
                service, rid, e), file=sys.stderr)
            continue
        listed += [(service, rid, c) for c in copies]
    if args.json:
        print(json.dumps([dict(c, service=s, rid=r) for s, r, c in listed],
                         indent=1, sort_keys=True))
    elif not listed:
        print('no diverged copy on this host')
    else:
        for service, rid, copy in listed:
            print(_line(service, rid, copy))
    return 0


@command('data diverged drop', 'delete one diverged copy of this host, named'
         ' by its id (as `data diverged list` shows it)', [
             (('service',), dict(metavar='SERVICE')),
             (('id',), dict(metavar='ID')),
             (('--yes',), dict(action='store_true',
                               help='do not ask for confirmation')),
         ])
def diverged_drop(args):
    for service, rid, engine in _data(args):
        try:
            copies = {c['id']: c for c in engine.diverged()}
        except (ReplicationError, OSError) as e:
            raise UserError('%s %s: cannot list the diverged copies: %s' % (
                service, rid, e))
        if args.id not in copies:
            continue
        if not args.yes:
            if not sys.stdin.isatty():
                raise UserError('drop %s: confirm with --yes (no terminal to'
                                ' ask on)' % args.id)
            print(_line(service, rid, copies[args.id]))
            answer = input('delete this copy for good? [y/N] ')
            if answer.strip().lower() not in ('y', 'yes'):
                print('kept %s' % args.id)
                return 1
        try:
            engine.drop_diverged(args.id)
        except (ReplicationError, OSError) as e:
            raise UserError(str(e))
        print('deleted the diverged copy %s of %s %s (%s)' % (
            args.id, service, rid, copies[args.id]['path']))
        return 0
    raise UserError('no diverged copy %r of service %s on this host (`slaposha'
                    ' data diverged list %s` lists them)' % (
                        args.id, args.service, args.service))
