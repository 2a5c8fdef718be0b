"""The ``slaposha`` command.

Each subcommand is a function ``(args) -> exit code`` registered with
:func:`slaposha.cli.commands.command`: those defined here, and those of the
modules imported below (their place sets the order of ``--help``). User
mistakes (configuration, arguments) end as one line on stderr and exit
code 2; nothing a user can type prints a traceback.
"""

import argparse
import sys

from slaposha import __version__, config
from slaposha.cli.commands import (
    COMMANDS, EXIT_USAGE, HOST_ARG, SLAPOS_CFG, UserError, agent_call,
    api_client, cluster_of, command, local_host, read_reference,
    setup_logging)


@command('config check', 'validate the cluster file and every service file', [
    (('service_files',), dict(nargs='*', metavar='SERVICE_FILE',
                              help='check only these service files')),
])
def config_check(args):
    cluster = cluster_of(args)
    cluster.check_ssl_dir()
    if args.service_files:
        services = [config.load_service(p, cluster)
                    for p in args.service_files]
    else:
        services = config.load_services(cluster)
    print('%s: cluster %s, hosts %s%s, etcd %s, %d service(s)%s' % (
        cluster.path, cluster.name, ' '.join(cluster.cluster.hosts),
        (', witnesses ' + ' '.join(cluster.cluster.witnesses))
        if cluster.cluster.witnesses else '',
        cluster.etcd.mode, len(services),
        ': ' + ' '.join(s.name for s in services) if services else ''))
    return 0


@command('config keys', 'list every configuration key with its default')
def config_keys(args):
    from slaposha.portal.config import describe
    print(config.describe_schema())
    print(describe())
    return 0


@command('agent', 'run the agent of this host in the foreground', [HOST_ARG])
def agent(args):
    from slaposha.daemon import Daemon, install_stop_signals
    from slaposha.cgroup import CgroupError
    from slaposha.cluster.member import MemberError
    cluster = cluster_of(args)
    host = local_host(args, cluster, cluster.cluster.hosts, 'hosts')
    setup_logging(host)
    try:
        daemon = Daemon(cluster, host)
        install_stop_signals(daemon.stop)
        daemon.run()
    except (CgroupError, MemberError) as e:
        raise UserError(str(e))
    return 0


@command('witness', 'run only an etcd member, as a witness host',
         [HOST_ARG])
def witness(args):
    import threading
    from slaposha.daemon import install_stop_signals, run_witness
    from slaposha.cluster.member import MemberError
    cluster = cluster_of(args)
    if cluster.etcd.mode != 'embedded':
        raise UserError('%s: [etcd] mode = external: a witness runs an'
                        ' embedded member, it has nothing to do'
                        % cluster.path)
    host = local_host(args, cluster, cluster.members, 'hosts or witnesses')
    setup_logging(host)
    stop = threading.Event()
    install_stop_signals(stop.set)
    try:
        run_witness(cluster, host, stop)
    except MemberError as e:
        raise UserError(str(e))
    return 0


@command('status', 'the cluster as a tree: hosts, services, owners, each'
         ' resource and the last decision with its reason', [
             (('service',), dict(nargs='?', help='only this service')),
             (('--json',), dict(action='store_true',
                                help='print the raw status as JSON')),
         ])
def status(args):
    import json
    from slaposha.cli.status import render
    answer = agent_call(args, 'GET', '/status')
    if args.service and args.service not in answer.get('services', {}) \
            and answer.get('services') is not None:
        raise UserError('no service %r' % args.service)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print('\n'.join(render(answer, args.service)))
    return 0


@command('mon', 'the cluster on one screen, redrawn as it changes: hosts,'
         ' etcd members, owners and tokens, standbys, last decisions and'
         ' takeovers', [
             (('--once',), dict(action='store_true',
                                help='print one frame and exit (for'
                                ' scripts)')),
         ])
def mon(args):
    import os
    from slaposha.cli.mon import main_loop
    api = getattr(args, 'api', None) or os.environ.get('SLAPOSHA_API')

    def history():
        try:
            return agent_call(args, 'GET', '/history').get('history')
        except UserError:
            return None  # etcd out of reach: the frame says so already
    if args.once:
        status = agent_call(args, 'GET', '/status')
        from slaposha.cli.mon import frame
        print('\n'.join(frame(status, history())))
        return 0
    if api:
        client = api_client(args, api)
        statuses = client.events
    else:
        statuses = None
    from slaposha.api.client import ApiError
    return main_loop(lambda: agent_call(args, 'GET', '/status'), history,
                     statuses, (UserError, ApiError))


@command('log', 'the decisions of an agent, oldest first: what it did and'
         ' why', [(('--json',), dict(action='store_true',
                                       help='print JSON'))])
def log(args):
    import json
    import time
    answer = agent_call(args, 'GET', '/decisions')
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    for d in answer.get('decisions', []):
        print('%s %s %s: %s: %s' % (
            time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d['time'])),
            answer.get('host'), d['service'], d['action'], d['reason']))
    return 0


def _done(answer, name, verb, to, here):
    svc = (answer.get('services') or {}).get(name)
    if svc is None:
        return False
    running = svc.get('owner') and \
        ((svc.get('on') or {}).get(svc['owner']) or {}).get('state') \
        == 'running'
    if verb == 'stop':
        return svc.get('owner') is None
    if verb in ('switch', 'takeover'):
        return running and svc['owner'] == (to or here) and \
            not svc.get('switch')
    if verb == 'start':
        return running and (to is None or svc['owner'] == to)
    return True


def _action(verb, with_to=False, help=''):
    arguments = [(('service',), dict(help='service name')),
                 (('--timeout',), dict(type=float, default=120.0,
                                       help='seconds to wait for the result'
                                            ' (default 120)')),
                 (('--no-wait',), dict(action='store_true',
                                       help='return once the request is'
                                            ' recorded'))]
    if verb in ('switch', 'takeover'):
        arguments.append((('--force',), dict(
            action='store_true', help='move it even to a host that is not'
            ' eligible (for instance its data is older than max_lag)')))
    if with_to:
        arguments.append((('--to',) if verb == 'switch' else ('--on',),
                          dict(dest='to', metavar='HOST',
                               required=verb == 'switch',
                               help='host to run it on')))

    def run(args):
        import time
        began, asked = time.monotonic(), time.time()
        body = {'to': args.to} if with_to and args.to else {}
        if getattr(args, 'force', False):
            body['force'] = True
        answer = agent_call(args, 'POST', '/services/%s/%s'
                             % (args.service, verb), body)
        print(answer['message'])
        if args.no_wait or verb in ('freeze', 'thaw'):
            return 0
        here = None
        while True:
            status = agent_call(args, 'GET', '/status')
            here = status.get('host')
            if _done(status, args.service, verb, getattr(args, 'to', None),
                     here):
                svc = status['services'][args.service]
                print('%s: %s after %.2f s' % (
                    args.service, 'runs on %s' % svc['owner']
                    if svc.get('owner') else 'stopped',
                    time.monotonic() - began))
                return 0
            svc = (status.get('services') or {}).get(args.service) or {}
            gone = svc.get('abandoned')
            if verb in ('switch', 'takeover') and gone and \
                    not svc.get('switch') and \
                    (gone.get('running') or 0) >= asked - 1:
                raise UserError('%s: the %s to %s was abandoned after %.1f s:'
                                ' %s; %s' % (
                                    args.service, verb, gone.get('to'),
                                    gone.get('duration') or 0,
                                    gone.get('reason'), 'owned by %s' %
                                    svc['owner'] if svc.get('owner') else
                                    'owned by no host yet'))
            if time.monotonic() - began > args.timeout:
                svc = (status.get('services') or {}).get(args.service, {})
                decisions = ['%s: %s: %s' % (h, on['decision'][1],
                                             on['decision'][2])
                             for h, on in (svc.get('on') or {}).items()
                             if on and on.get('decision')]
                raise UserError('%s: not done after %gs; %s' % (
                    args.service, args.timeout,
                    '; '.join(decisions) or 'no decision yet'))
            time.sleep(0.1)
    command(verb, help, arguments)(run)


_action('start', with_to=True, help='start a service (where the agents'
        ' choose, or --on HOST)')
_action('stop', help='stop a service everywhere; the agents leave it stopped')
_action('switch', with_to=True, help='planned move of a service to a host:'
        ' stop here, hand over ownership, start there')
_action('takeover', help='move a service to this host')
_action('freeze', help='the agents neither start nor stop the service')
_action('thaw', help='undo freeze')
from slaposha.cli import pki as _pki  # noqa: E402,F401 (cluster, cert)
from slaposha.cli import portal as _portal  # noqa: E402,F401 (portal)
from slaposha.cli import backup as _backup  # noqa: E402,F401 (snapshots...)


def _node(args):
    from slaposha.slapos.node import NodeError, load_node
    try:
        return load_node(args.slapos_cfg)
    except NodeError as e:
        raise UserError(str(e))


@command('slapos fingerprint', 'print, as JSON, what a standby of this node'
         ' must have the same (paths, uids, software releases, interfaces)'
         ' and what preparing one needs (accounts, slapos.cfg, SlapOS'
         ' install)', [SLAPOS_CFG])
def slapos_fingerprint(args):
    import json
    from slaposha.slapos.standby import reference
    print(json.dumps(reference(_node(args)), indent=2, sort_keys=True))
    return 0


def _published_fingerprint(args):
    """(service, resource id, fingerprint, owner) of the SlapOS node the
    owner's agent published, read through this host's agent (or --api):
    the service named by args.service, or the only one with a slapos
    resource."""
    try:
        answer = agent_call(args, 'GET', '/status')
    except UserError as e:
        raise UserError('%s; or compare with a fingerprint: --reference'
                        ' FILE' % e)
    if answer.get('services') is None:
        raise UserError('the agent cannot read the cluster: %s; or compare'
                        ' with a fingerprint: --reference FILE'
                        % answer.get('etcd'))
    found = []
    for name, svc in sorted(answer['services'].items()):
        for rid, facts in sorted((svc.get('facts') or {}).items()):
            if rid.startswith('slapos#') and (args.service in (None, name)):
                found.append((name, rid, facts, svc.get('owner')))
    if args.service and args.service not in answer['services']:
        raise UserError('no service %r (services: %s)' % (
            args.service, ', '.join(sorted(answer['services'])) or 'none'))
    if not found:
        raise UserError('%s: no owner has published a SlapOS node yet (it'
                        ' must run somewhere); give --reference FILE instead'
                        % (args.service or 'no service'))
    if len(found) > 1:
        raise UserError('several SlapOS nodes (%s): name the service' % (
            ', '.join('%s %s' % f[:2] for f in found)))
    return found[0], answer.get('host')


@command('slapos check', 'check that this host may be a standby of the node:'
         ' its paths, uids, software releases and interfaces against the'
         ' fingerprint its owner published (or --reference); one line per'
         ' thing to fix', [
             (('service',), dict(nargs='?', help='the service of the node'
                                 ' (default: the only one with a slapos'
                                 ' resource)')),
             SLAPOS_CFG,
             (('--reference',), dict(metavar='FILE', help='compare with this'
                                     ' fingerprint (JSON, from `slaposha'
                                     ' slapos fingerprint` on the owner; -'
                                     ' for stdin) instead of asking the'
                                     ' cluster')),
         ])
def slapos_check(args):
    from slaposha.slapos.node import compare, local_facts
    if args.reference:
        reference = read_reference(args.reference)
        if not isinstance(reference, dict):
            raise UserError('%s: not a fingerprint (expected a JSON object)'
                            % args.reference)
        node = _node(args)
        source = args.reference
    else:
        (service, rid, reference, owner), here = _published_fingerprint(args)
        if owner == here:
            print('%s owns %s: it is the reference, nothing to check here'
                  % (here, service))
            return 0
        if not args.slapos_cfg:
            # The node's slapos.cfg as the service file names it.
            args.slapos_cfg = next((
                r.cfg for c in config.load_services(cluster_of(args))
                if c.name == service for r in c.resources if r.rid == rid),
                None)
        node = _node(args)
        source = '%s of %s, published by %s' % (rid, service, owner)
    problems = compare(reference, local_facts(node, reference))
    for line in problems:
        print('- %s' % line)
    if problems:
        print('%s: not eligible as a standby of %s (%s): %d problem(s)' % (
            node.config_path, reference.get('computer_id'), source,
            len(problems)))
        return 1
    print('%s: eligible as a standby of %s (%s)' % (
        node.config_path, reference.get('computer_id'), source))
    return 0


@command('slapos save-parameters', 'save each partition\'s instance'
         ' parameters from the master into the node\'s data (run by the'
         ' owner, e.g. as a task)', [SLAPOS_CFG])
def slapos_save_parameters(args):
    from slaposha.slapos.parameters import ParametersError, fetch, save
    node = _node(args)
    try:
        path = save(node, fetch(node))
    except ParametersError as e:
        raise UserError('%s; the parameters saved before are kept' % e)
    print('saved the parameters of %s in %s' % (node.computer_id, path))
    return 0


@command('slapos partitions', 'each partition of the node in use: requested'
         ' state, programs (where supervisord runs), what is wrong,'
         ' addresses, software release and the parameters it was deployed'
         ' with; free and destroyed partitions are left out', [
             SLAPOS_CFG,
             (('--json',), dict(action='store_true', help='print JSON')),
         ])
def slapos_partitions(args):
    import json
    import time
    import xmlrpc.client
    from slaposha.slapos.node import NodeError
    from slaposha.slapos.parameters import ParametersError, load
    from slaposha.slapos.partitions import (
        AsideBook, partition_rows, row_line)
    from slaposha.slapos.supervisor import rpc
    node = _node(args)
    try:
        saved = load(node) or {}
    except ParametersError as e:
        raise UserError(str(e))
    try:
        infos = rpc(node.supervisord_socket, 2.0).supervisor.\
            getAllProcessInfo()
    except (OSError, xmlrpc.client.Error):
        infos = None  # not running here: a standby
    kept = saved.get('partitions', {})
    try:
        parts = {p.id: p for p in node.partitions()}
        rows = partition_rows(node, infos, saved, AsideBook(node).current())
    except NodeError as e:
        raise UserError(str(e))
    for row in rows:
        part = parts.get(row['id'])
        info = kept.get(row['id'], {})
        row.update({
            'user': part.user if part else None,
            'uid': part.uid if part else None,
            'addresses': ['%s/%d' % a for a in part.addresses] if part
            else [], 'software_release': info.get('software_release'),
            'state': info.get('state'), 'title': info.get('title'),
            'parameters': info.get('parameters')})
    if args.json:
        print(json.dumps({'saved': saved.get('saved'), 'partitions': rows},
                         indent=2, sort_keys=True))
        return 0
    print('%s: %d partition(s) in use%s; parameters saved %s' % (
        node.computer_id, len(rows), '' if infos is not None else
        ' (supervisord not running here)', time.strftime(
            '%Y-%m-%d %H:%M:%S', time.localtime(saved['saved']))
        if saved.get('saved') else 'never (run `slaposha slapos'
        ' save-parameters` on the owner)'))
    for row in rows:
        print(row_line(row))
        if row['user'] or row['addresses']:
            print('    %s %s' % (row['user'] or '-',
                                 ' '.join(row['addresses'])))
        if row['software_release']:
            print('    %s (%s) %s' % (row['title'], row['state'],
                                      row['software_release']))
        for key, value in sorted((row['parameters'] or {}).items()):
            print('    %s = %s' % (key, value))
    return 0


from slaposha.cli import adopt as _adopt  # noqa: E402,F401 (slapos adopt...)
from slaposha.cli import diverged as _diverged  # noqa: E402,F401 (data)


@command('version', 'print the version of slaposha')
def version(args):
    print('slaposha %s' % __version__)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog='slaposha',
        description='High availability for SlapOS compute nodes.',
        epilog='The cluster file defaults to %s (or $SLAPOSHA_CONFIG).'
        % config.DEFAULT_CLUSTER_FILE)
    parser.add_argument('--version', action='version',
                        version='slaposha %s' % __version__)
    parser.add_argument('-c', '--cluster', metavar='FILE',
                        help='cluster file')
    parser.add_argument('--api', metavar='URL|HOST',
                        help='talk to this agent\'s HTTPS API with the'
                        ' operator certificate of $SLAPOSHA_CERT_DIR or'
                        ' ~/.slaposha (default: the agent of this host, on'
                        ' its unix socket)')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    groups = {}
    for name, help, arguments, func in COMMANDS:
        words = name.split()
        target = sub
        for depth, word in enumerate(words[:-1]):
            key = tuple(words[:depth + 1])
            if key not in groups:
                p = target.add_parser(word, help='%s commands' % word)
                groups[key] = p.add_subparsers(dest='subcommand',
                                               metavar='SUBCOMMAND')
                groups[key].required = True
            target = groups[key]
        p = target.add_parser(words[-1], help=help, description=help)
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(func=func)
    return parser


def find_command(name):
    """(help, arguments, func) of the subcommand ``name`` (e.g. 'slapos
    check'); `slapos ha` builds its commands from these."""
    for cname, help, arguments, func in COMMANDS:
        if cname == name:
            return help, arguments, func
    raise KeyError(name)


def run_command(func, args, prog='slaposha'):
    """Run a subcommand: a user's mistake is one line on stderr, exit 2."""
    try:
        return func(args)
    except (config.ConfigError, UserError) as e:
        print('%s: %s' % (prog, e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'func', None) is None:
        parser.print_help()
        return EXIT_USAGE
    return run_command(args.func, args)


if __name__ == '__main__':
    sys.exit(main())
