"""``slaposha snapshots``, ``restore``, ``export`` and ``import``: the backups a host keeps
of a service's btrfs data (see :mod:`slaposha.backup`). They run on the
host whose copy they read, as root, without the agent.

SERVICE is the name of one of the cluster's services, or the path of a
service file (on a host that is not set up yet).
"""

import json
import os

from slaposha.cli.commands import UserError, agent_call, command
from slaposha.units import human_bytes, human_seconds


def _service(args):
    from slaposha import config
    if os.sep in args.service or args.service.endswith('.cfg'):
        if not os.path.isfile(args.service):
            raise UserError('%s: no such service file' % args.service)
        return config.load_service(args.service)
    cluster = config.load_cluster(args.cluster)
    for service in config.load_services(cluster):
        if service.name == args.service:
            return service
    raise UserError('no service %r in %s' % (args.service,
                                              cluster.services_dir))


def _timeout(what):
    return (('--timeout',), dict(
        type=float, default=3600.0, help='seconds the %s may take; past'
        ' them it is undone (default 3600)' % what))


def _volumes(args):
    from slaposha.backup import BackupError, volumes_of
    try:
        return volumes_of(_service(args))
    except BackupError as e:
        raise UserError(str(e))


def _data(args):
    """(btrfs volumes, rsync trees) of the service; UserError without
    either."""
    from slaposha.backup import BackupError, trees_of, volumes_of
    service = _service(args)
    trees = trees_of(service)
    try:
        return volumes_of(service), trees
    except BackupError:
        if not trees:
            raise UserError('%s: service %s has neither [btrfs#...] nor'
                            ' [rsync#...] data' % (service.path,
                                                   service.name))
        return [], trees


@command('snapshots', 'the snapshots this host keeps of a service\'s btrfs'
         ' data: when, by which owner (token, host), the space only each'
         ' holds, and why it is kept', [
             (('service',), dict(help='service name or service file')),
             (('--json',), dict(action='store_true', help='print JSON')),
             (('--no-size',), dict(action='store_true',
                                   help='skip the sizes (they read every'
                                   ' file\'s extents)')),
         ])
def snapshots(args):
    from slaposha.backup import BackupError, format_time, listing
    out = {}
    for volume in _volumes(args):
        try:
            out[volume.path] = listing(volume, sizes=not args.no_size)
        except BackupError as e:
            raise UserError(str(e))
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    for path, rows in out.items():
        dated = [r['created'] for r in rows if r['created'] is not None]
        print('%s: %d snapshot(s)%s' % (
            path, len(rows), ', oldest %s, newest %s UTC' % (
                format_time(min(dated)), format_time(max(dated)))
            if dated else ''))
        if rows:
            print('  %-19s  %-14s %6s  %-10s %9s  %s' % (
                'TAKEN (UTC)', 'SNAPSHOT', 'TOKEN', 'HOST', 'SIZE',
                'KEPT AS'))
        for r in rows:
            print('  %-19s  %-14s %6d  %-10s %9s  %s' % (
                format_time(r['created']), r['name'], r['token'],
                r['host'] or '?', '?' if r['size'] is None
                else human_bytes(r['size']), ', '.join(r['kept'])))
    return 0


@command('restore', 'bring a whole service back to a snapshot (a planned'
         ' operation of its owner: stop, the data before kept aside, start),'
         ' or, with --path and --to, restore one folder (a partition) from a'
         ' snapshot this host keeps into a new folder next to the live data,'
         ' without stopping the service', [
             (('service',), dict(help='service name or service file')),
             (('--at',), dict(required=True, metavar='TIME|SNAPSHOT',
                              help='a snapshot name, or the newest snapshot'
                              ' taken at or before this time ("2026-12-04'
                              ' 12:30" UTC, "5m ago")')),
             (('--path',), dict(metavar='P',
                                help='the folder or file to restore, in the'
                                ' live volume (absolute, or relative to'
                                ' it)')),
             (('--to',), dict(metavar='DIR',
                              help='where the copy goes; must not exist')),
             (('--yes',), dict(action='store_true',
                               help='the whole service: do not ask for'
                               ' confirmation')),
             (('--no-wait',), dict(action='store_true',
                                   help='the whole service: return once the'
                                   ' request is recorded')),
             (('--timeout',), dict(type=float, default=None, help='seconds'
                                   ' the copy may take (default 3600; past'
                                   ' them it is undone), or to wait for the'
                                   ' whole service\'s restore (default'
                                   ' 300)')),
         ])
def restore(args):
    from slaposha.backup import (
        BackupError, choose, format_time, restore_path)
    if not args.path and not args.to:
        return _restore_service(args)
    if not args.path or not args.to:
        raise UserError('restore: give both --path P and --to DIR (one'
                        ' folder), or neither (the whole service)')
    volumes = _volumes(args)
    path = args.path
    volume = volumes[0]
    if os.path.isabs(path):
        for v in volumes:
            if path == v.path or path.startswith(v.path.rstrip('/') + '/'):
                volume = v
                break
    try:
        snap, created = choose(volume, args.at)
        to, files, size, seconds = restore_path(
            volume, snap, path, args.to, timeout=args.timeout or 3600.0)
    except BackupError as e:
        raise UserError(str(e))
    print('restored %s as of snapshot %s (taken %s UTC) to %s: %d file(s),'
          ' %s in %s' % (path, snap.name, format_time(created), to, files,
                         human_bytes(size), human_seconds(seconds)))
    return 0


def _restore_service(args):
    """The whole service back to a snapshot, by its owner through the
    agents (this host's, or --api): asked, then waited for like a switch."""
    import sys
    import time
    if os.sep in args.service or args.service.endswith('.cfg'):
        raise UserError('restore %s: name a service of the cluster (its'
                        ' owner restores it), not a file' % args.service)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError('restore %s: confirm with --yes (no terminal to'
                            ' ask on)' % args.service)
        answer = input('restore %s to %s: it stops, its data now is kept'
                       ' aside on its owner, and it starts again from the'
                       ' snapshot. Go on? [y/N] ' % (args.service, args.at))
        if answer.strip().lower() not in ('y', 'yes'):
            print('nothing done')
            return 1
    began, asked = time.monotonic(), time.time()
    answer = agent_call(args, 'POST', '/services/%s/restore'
                        % args.service, {'at': args.at})
    print(answer['message'])
    if args.no_wait:
        return 0
    timeout = 300.0 if args.timeout is None else args.timeout
    while True:
        status = agent_call(args, 'GET', '/status')
        svc = (status.get('services') or {}).get(args.service) or {}
        ended = svc.get('restored')
        if not svc.get('restore') and ended and \
                (ended.get('since') or 0) >= asked - 1:
            if ended.get('outcome') == 'done':
                print('%s: restored on %s after %.2f s: %s' % (
                    args.service, ended.get('from'),
                    time.monotonic() - began, ended.get('reason')))
                return 0
            raise UserError('%s: the restore was undone after %.1f s: %s;'
                            ' %s' % (args.service, ended.get('duration') or 0,
                                     ended.get('reason'),
                                     'runs on %s' % svc['owner']
                                     if svc.get('owner') else
                                     'runs on no host yet'))
        if time.monotonic() - began > timeout:
            op = svc.get('operation') or {}
            raise UserError('%s: the restore did not end within %gs%s' % (
                args.service, timeout, ': %s' % op['stage']
                if op.get('stage') else ''))
        time.sleep(0.2)


@command('export', 'write a snapshot of a service\'s btrfs data to a file:'
         ' a compressed btrfs send stream with its SHA-256, incremental'
         ' against the previous export in the same folder when asked (rsync'
         ' data: a tar archive of its newest consistent copy here)', [
             (('service',), dict(help='service name or service file')),
             (('--to',), dict(required=True, metavar='FILE|DIR',
                              help='the file, or a folder where it gets its'
                              ' own name')),
             (('--at',), dict(metavar='TIME|SNAPSHOT',
                              help='which snapshot (default: the newest)')),
             (('--incremental',), dict(action='store_true',
                                       help='only what changed since the'
                                       ' previous export in that folder')),
             (('--full-every',), dict(type=int, metavar='N',
                                      help='with --incremental: a full'
                                      ' export after N-1 incremental ones'
                                      ' in a row')),
             (('--keep',), dict(type=int, metavar='N',
                                help='then delete the service\'s older'
                                ' exports in that folder but the newest N'
                                ' and those they need (the parents of'
                                ' incremental ones)')),
             (('--json',), dict(action='store_true',
                                help='print each export\'s description (its'
                                ' .json) as one line')),
             _timeout('export'),
         ])
def export(args):
    from slaposha import backup
    if args.keep is not None and (args.keep < 1 or
                                  not os.path.isdir(args.to)):
        raise UserError('--keep %d: expected at least 1, with --to a folder'
                        % args.keep)
    if args.full_every is not None and args.full_every < 1:
        raise UserError('--full-every %d: expected at least 1'
                        % args.full_every)
    volumes, trees = _data(args)
    # With btrfs volumes beside, --incremental is theirs.
    if trees and ((args.incremental and not volumes) or args.at):
        raise UserError('%s: rsync data (%s) is exported whole, from its'
                        ' newest copy here: no snapshots to choose or to be'
                        ' incremental against' % (
                            '--incremental' if args.incremental else '--at',
                            trees[0].path))
    if len(volumes) + len(trees) > 1 and not os.path.isdir(args.to):
        raise UserError('--to %s: service %s has %d volumes or trees: give'
                        ' a folder' % (args.to, args.service,
                                       len(volumes) + len(trees)))
    label = os.path.splitext(os.path.basename(args.service))[0]
    for tree in trees:
        try:
            done = backup.export_tree(tree, args.to, label,
                                      timeout=args.timeout)
        except backup.BackupError as e:
            raise UserError(str(e))
        _exported(args, backup, tree, label, done)
    for volume in volumes:
        try:
            if args.at:
                snap, _ = backup.choose(volume, args.at)
            else:
                snap = volume.newest()
                if snap is None:
                    raise backup.BackupError('%s: no snapshot on this host'
                                             % volume.path)
            done = backup.export(volume, snap, args.to, label,
                                 incremental=args.incremental,
                                 timeout=args.timeout,
                                 full_every=args.full_every)
        except backup.BackupError as e:
            raise UserError(str(e))
        _exported(args, backup, volume, label, done)
    return 0


def _exported(args, backup, data, label, done):
    """Prune the folder (--keep), say what was done."""
    gone = []
    if args.keep is not None:
        gone = backup.prune_exports(args.to, data, label, args.keep)
    if args.json:
        print(json.dumps(dict(done, deleted=gone), sort_keys=True))
        return
    print('exported %s (taken %s UTC) to %s: %s, %s in %s, sha256 %s' % (
        done['snapshot'], backup.format_time(done['created']), done['file'],
        done['note'], human_bytes(done['bytes']),
        human_seconds(done['seconds']), done['sha256']))
    if gone:
        print('deleted %d older export(s) of %s in %s (--keep %d): %s' % (
            len(gone), data.path, args.to, args.keep,
            ' '.join(os.path.basename(g) for g in gone)))


@command('import', 'check an export\'s checksum and receive it among the'
         ' snapshots of a service\'s btrfs data on this host (any host; an'
         ' rsync archive: into the tree\'s store, as its newest copy)', [
             (('service',), dict(help='service name or service file')),
             (('file',), dict(help='the export (FILE.sha256 and FILE.json'
                              ' beside it)')),
             _timeout('import'),
         ])
def import_(args):
    from slaposha import backup
    volumes, trees = _data(args)
    try:
        with open(args.file + '.json') as f:
            meta = json.load(f)
        wanted, form = meta.get('volume'), meta.get('format')
    except (OSError, ValueError, AttributeError):
        wanted = form = None
    try:
        if form == 'tar':
            if not trees:
                raise UserError('%s: an rsync archive, and service %s has no'
                                ' [rsync#...] data' % (args.file,
                                                       args.service))
            tree = dict((t.path, t) for t in trees).get(wanted, trees[0])
            _, line = backup.import_tree(tree, args.file,
                                         timeout=args.timeout)
        else:
            if not volumes:
                raise UserError('%s: not an rsync archive (its .json'
                                ' beside it says), and service %s has no'
                                ' [btrfs#...] data' % (args.file,
                                                       args.service))
            volume = dict((v.path, v) for v in volumes).get(wanted,
                                                            volumes[0])
            _, line = backup.import_export(volume, args.file,
                                           timeout=args.timeout)
    except backup.BackupError as e:
        raise UserError(str(e))
    print(line)
    return 0
