"""The instance supervisord of a node, as slapgrid runs it: its XML-RPC
over ``instance_root/sv.sock`` and the command that launches it."""

import xmlrpc.client

__all__ = ['rpc', 'state', 'SUPERVISORD', 'STARTED']

# As slapgrid launches it (slapos.grid.svcbackend.launchSupervisord):
# ``python -c SUPERVISORD <supervisord.conf>``.
SUPERVISORD = ('import sys; import supervisor.supervisord; '
               'sys.argv[1:1] = ["-c", sys.argv.pop(1)]; '
               'supervisor.supervisord.main()')

# supervisor's Faults.SUCCESS: a process of startProcessGroup's result that
# started.
STARTED = 80


def rpc(socket_path, timeout=5.0):
    """supervisor's XML-RPC proxy over the unix socket ``socket_path``."""
    from supervisor.xmlrpc import SupervisorTransport
    transport = SupervisorTransport(None, None, 'unix://' + socket_path)
    transport.timeout = timeout
    return xmlrpc.client.ServerProxy('http://127.0.0.1', transport=transport)


def state(node, timeout=2.0):
    """supervisord's state name ('RUNNING'), or None when it does not
    answer."""
    try:
        return rpc(node.supervisord_socket, timeout).supervisor.getState()[
            'statename']
    except (OSError, xmlrpc.client.Error):
        return None
