"""What every ``slaposha`` subcommand uses: the registry that
:func:`command` fills (the modules of ``slaposha/cli/`` register their
commands on import; :mod:`slaposha.cli.main` imports them all and builds
the parser), the one-line :class:`UserError`, the cluster file, this
host's name, and the agent to ask (its unix socket, or ``--api``).
"""

import os
import sys

from slaposha import config

__all__ = ['COMMANDS', 'EXIT_USAGE', 'command', 'UserError', 'cluster_of',
           'setup_logging', 'local_host', 'HOST_ARG', 'SLAPOS_CFG',
           'agent_call', 'api_client', 'read_reference']

EXIT_USAGE = 2

# (name, help, arguments, func) of every subcommand, in the order of --help.
COMMANDS = []


def command(name, help, arguments=()):
    """Register a subcommand; ``arguments`` are (flags, kwargs) pairs."""
    def register(func):
        COMMANDS.append((name, help, arguments, func))
        return func
    return register


class UserError(Exception):
    """A mistake of the user's, printed as one line (exit code 2)."""


def cluster_of(args):
    return config.load_cluster(args.cluster)


def setup_logging(host):
    import logging
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format='%(asctime)s ' + host + ' %(name)s: %(message)s')
    logging.getLogger('urllib3').setLevel(logging.WARNING)


def local_host(args, cluster, allowed, what):
    from slaposha.daemon import default_host
    host = args.host or default_host()
    if host not in allowed:
        raise UserError('%s: this host is %r (--host, or the hostname), which'
                        ' is not one of the %s of [cluster] (%s)' % (
                            cluster.path, host, what, ' '.join(allowed)))
    return host


HOST_ARG = (('--host',), dict(help='name of this host in the cluster file'
                                   ' (default: the short hostname)'))

SLAPOS_CFG = (('--slapos-cfg',), dict(
    metavar='FILE', help='the node\'s slapos.cfg (default'
    ' /etc/opt/slapos/slapos.cfg or $SLAPOS_CONFIGURATION)'))


def agent_call(args, method, route, body=None):
    """Ask an agent; one line and exit 2 when it cannot. With --api (or
    $SLAPOSHA_API), over HTTPS with the operator's certificate; else the
    agent of this host over its unix socket (root only)."""
    from slaposha.api.local import AgentUnreachable, call
    api = getattr(args, 'api', None) or os.environ.get('SLAPOSHA_API')
    if api:
        return _api_call(args, api, method, route, body)
    cluster = cluster_of(args)
    path = os.path.join(cluster.cluster.run_dir, 'agent.sock')
    try:
        status, answer = call(path, method, route, body)
    except AgentUnreachable as e:
        raise UserError(str(e))
    if status >= 400:
        raise UserError(answer.get('error', 'agent answered %d' % status))
    return answer


def _api_url(args, api):
    from slaposha.api.client import url_for
    if '://' not in api:
        # A host name of the cluster: its address, as its certificate says.
        cluster = cluster_of(args)
        if api not in cluster.hosts:
            raise UserError('--api %s: neither a URL nor a host of the'
                            ' cluster (%s)' % (api, ' '.join(cluster.hosts)))
        api = url_for(cluster, api)
    return api


def api_client(args, api):
    """The HTTPS client of ``api`` (a URL or a host of the cluster), one
    per command."""
    from slaposha.api.client import ApiClient, ApiError
    api = _api_url(args, api)
    try:
        client = getattr(args, '_api_client', None)
        if client is None:
            client = args._api_client = ApiClient(api)
        return client
    except ApiError as e:
        raise UserError('%s: %s' % (api, e))


def _api_call(args, api, method, route, body):
    from slaposha.api.client import ApiError
    client = api_client(args, api)
    try:
        return client.request(method, route, body)
    except ApiError as e:
        raise UserError('%s: %s' % (client.url, e))


def read_reference(path):
    """An owner's fingerprint, from a file or - (stdin)."""
    from slaposha.inputs import MAX_VALUE, loads
    try:
        if path == '-':
            text = sys.stdin.read(MAX_VALUE + 1)
        else:
            with open(path) as f:
                text = f.read(MAX_VALUE + 1)
        return loads(text, MAX_VALUE, 'the fingerprint', require=None)
    except (OSError, ValueError) as e:
        raise UserError('%s: cannot read the fingerprint: %s' % (path, e))
