"""``python -m slaposha.lab``: bring a lab up by hand, list or clean labs."""

import argparse
import json
import os
import signal
import sys

from slaposha.lab import RUN_ROOT, Lab, LabError, cleanup_stale


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m slaposha.lab',
        description='The multi-host lab of slaposha (network and mount'
        ' namespaces on a private bridge).')
    sub = parser.add_subparsers(dest='action', metavar='ACTION')
    sub.required = True
    up = sub.add_parser('up', help='start a lab and keep it until Ctrl-C')
    up.add_argument('hosts', nargs='*', default=['hA', 'hB', 'hW'])
    sub.add_parser('list', help='list the labs of this machine')
    clean = sub.add_parser('cleanup', help='remove labs whose owner is gone')
    clean.add_argument('--all', action='store_true',
                       help='also labs whose owner still runs')
    args = parser.parse_args(argv)
    try:
        if args.action == 'up':
            with Lab(args.hosts) as lab:
                for host in lab:
                    print('%-6s %-12s %-14s nsenter --net=%s --mount=%s'
                          ' --uts=%s' % (host.name, host.address,
                                         host.address6, host.net_path,
                                         host.mnt_path, host.uts_path))
                print('lab %s is up; Ctrl-C tears it down' % lab.id)
                sys.stdout.flush()
                try:
                    signal.pause()
                except KeyboardInterrupt:
                    pass
        elif args.action == 'list':
            for lab_id in sorted(os.listdir(RUN_ROOT)
                                 if os.path.isdir(RUN_ROOT) else []):
                try:
                    with open(os.path.join(RUN_ROOT, lab_id,
                                           'state.json')) as f:
                        state = json.load(f)
                except (OSError, ValueError):
                    continue
                print('%s owner pid %s, hosts %s' % (
                    lab_id, state['owner'][0],
                    ' '.join(n.split('-', 2)[2] for n in state['netns'])))
        else:
            for lab_id in cleanup_stale(everything=args.all):
                print('removed lab %s' % lab_id)
    except LabError as e:
        print('slaposha lab: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
