"""By hand, on one host: ``python -m slaposha.replication <command>``.

The agent does all of this by itself; these commands are for operators
(look, promote by hand) and for tests and benchmarks, which run each host's
side in a process inside that host::

    receiver --host hA --listen 10.0.0.1 --ssl-dir D VOLUME...   # foreground
             [--tree PATH]... [--copy-root PATH]...   # rsync trees, copies
             [--retention 10,24,7,4]        # snapshots kept as backups
    status VOLUME                   # JSON: snapshots, lag, token, diverged
    promote VOLUME                  # newest snapshot -> writable volume
    cycle VOLUME --host hA --token 7 --ssl-dir D --peer hB=10.0.0.2[:1216]

Errors are one line on stderr, exit code 1.
"""

import argparse
import json
import logging
import os
import signal
import sys

from slaposha.replication import Peer, ReplicationError
from slaposha.replication.receiver import DEFAULT_PORT, Receiver
from slaposha.replication.sender import Sender
from slaposha.replication.volume import Volume
from slaposha.replication.retention import Retention


def tls_files(ssl_dir, host):
    return tuple(os.path.join(ssl_dir, n) for n in
                 ('ca.crt', host + '.crt', host + '.key'))


def parse_peer(text):
    """``name=address[:port]`` (an IPv6 address in brackets)."""
    name, sep, where = text.partition('=')
    if not sep or not name or not where:
        raise argparse.ArgumentTypeError('expected name=address[:port], got'
                                         ' %r' % text)
    port = DEFAULT_PORT
    if where.startswith('['):
        address, _, rest = where[1:].partition(']')
        if rest.startswith(':'):
            port = int(rest[1:])
    elif where.count(':') == 1:
        address, port = where.split(':')
        port = int(port)
    else:
        address = where
    return Peer(name, address, port)


def parse_retention(text):
    """``minutely,hourly,daily,weekly`` counts, e.g. ``10,24,7,4``."""
    try:
        minutely, hourly, daily, weekly = [int(n) for n in text.split(',')]
        return Retention(minutely, hourly, daily, weekly)
    except ValueError:
        raise argparse.ArgumentTypeError('expected MINUTELY,HOURLY,DAILY,'
                                         'WEEKLY (four counts), got %r'
                                         % text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m slaposha.replication',
                                     description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('receiver', help='receive snapshots (foreground)')
    p.add_argument('--host', required=True, help="this host's name")
    p.add_argument('--listen', required=True, help="this host's address")
    p.add_argument('--port', type=int, default=DEFAULT_PORT)
    p.add_argument('--ssl-dir', required=True)
    p.add_argument('--idle-timeout', type=float, default=10.0)
    p.add_argument('--hosts', nargs='*', help='serve only these hosts')
    p.add_argument('--tree', action='append', default=[],
                   help='a tree of an rsync resource to receive')
    p.add_argument('--copy-root', action='append', default=None,
                   help='where one-off copies may land (/opt/slapgrid)')
    p.add_argument('--retention', type=parse_retention, default=None,
                   metavar='MINUTELY,HOURLY,DAILY,WEEKLY',
                   help='snapshots kept as backups (default: none)')
    p.add_argument('volumes', nargs='*')
    p = sub.add_parser('status', help='what this host holds of a volume')
    p.add_argument('volume')
    p = sub.add_parser('promote', help='make the newest snapshot writable')
    p.add_argument('volume')
    p = sub.add_parser('cycle', help='one snapshot sent to the peers')
    p.add_argument('volume')
    p.add_argument('--host', required=True)
    p.add_argument('--token', type=int, required=True)
    p.add_argument('--ssl-dir', required=True)
    p.add_argument('--peer', type=parse_peer, action='append', default=[])
    p.add_argument('--keep', type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(message)s')
    try:
        if args.command == 'receiver':
            from slaposha.replication.receiver import COPY_ROOTS, TreeReceiver
            trees = TreeReceiver(args.tree, args.copy_root or COPY_ROOTS,
                                 idle_timeout=args.idle_timeout)
            volumes = [Volume(path) for path in args.volumes]
            for volume in volumes:
                volume.retention = args.retention
            receiver = Receiver(args.listen, args.port,
                                tls_files(args.ssl_dir, args.host),
                                volumes, args.idle_timeout,
                                hosts=args.hosts,
                                handlers=trees.handlers).listen()

            def stop(signum, frame):
                raise SystemExit(0)
            signal.signal(signal.SIGTERM, stop)
            print('listening on %s:%d' % (args.listen, args.port),
                  flush=True)
            receiver.serve_forever()
        elif args.command == 'status':
            print(json.dumps(Volume(args.volume).status(), indent=1))
        elif args.command == 'promote':
            print(Volume(args.volume).promote())
        elif args.command == 'cycle':
            sender = Sender(args.volume, args.token, args.peer,
                            tls_files(args.ssl_dir, args.host), args.host,
                            keep=args.keep)
            cycle = sender.cycle()
            print(json.dumps({
                'snapshot': cycle.snapshot.name, 'seconds': cycle.seconds,
                'sent': {k: t._asdict() for k, t in cycle.results.items()},
                'errors': {str(k): str(e) for k, e in cycle.errors.items()},
            }))
            return 1 if cycle.errors else 0
    except ReplicationError as e:
        print('error: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
