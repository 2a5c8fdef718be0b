"""``slapos ha ...``: the slaposha commands inside the slapos CLI.

Registered in setup.py's ``slapos.cli`` entry point group, so that an
operator who knows ``slapos node ...`` finds every operator's command of
slaposha as ``slapos ha ...`` in ``slapos --help`` (COMMANDS below: status,
mon, log, start, stop, switch, takeover, freeze, thaw, check, adopt,
prepare-standby, release, snapshots, restore, export, import, data diverged
list | drop). Each one is the
``slaposha`` command of the same name (its arguments, its code, its output),
with ``--cfg`` for the cluster file as every slapos command has.

This module imports nothing of slaposha until a command runs: slapos loads
every plugin to print its help, and a plugin that fails to import breaks
``slapos --help`` for everyone (slapos.cli.entry's help cannot show it).
"""

import argparse
import os
import sys

from slapos.cli.command import Command

# As slaposha.config.DEFAULT_CLUSTER_FILE, which this module does not import.
DEFAULT_CFG = '/etc/opt/slaposha/cluster.cfg'


class HaCommand(Command):
    """a slaposha command"""

    command_group = 'ha'
    # The matching subcommand of `slaposha`.
    slaposha_command = None

    def _slaposha(self):
        """slaposha.cli.main, or the ImportError that keeps it away."""
        try:
            from slaposha.cli import main
            return main
        except ImportError as e:
            return e

    def get_description(self):
        main = self._slaposha()
        if isinstance(main, ImportError):
            return super().get_description()
        return main.find_command(self.slaposha_command)[0]

    def get_parser(self, prog_name):
        parser = super().get_parser(prog_name)
        parser.add_argument(
            '--cfg', metavar='FILE', dest='cluster',
            default=os.environ.get('SLAPOSHA_CONFIG') or DEFAULT_CFG,
            help='slaposha cluster file (default $SLAPOSHA_CONFIG or %s)'
            % DEFAULT_CFG)
        parser.add_argument(
            '--api', metavar='URL|HOST', help='talk to this agent\'s HTTPS'
            ' API with the operator certificate (default: the agent of this'
            ' host, on its unix socket)')
        main = self._slaposha()
        if isinstance(main, ImportError):
            parser.add_argument('arguments', nargs=argparse.REMAINDER)
            return parser
        for flags, kwargs in main.find_command(self.slaposha_command)[1]:
            parser.add_argument(*flags, **kwargs)
        return parser

    def take_action(self, parsed_args):
        prog = 'slapos ha %s' % ha_name(self.slaposha_command)
        main = self._slaposha()
        if isinstance(main, ImportError):
            print('%s: slaposha cannot be loaded in this Python (%s): install'
                  ' slaposha with its dependencies beside slapos.core'
                  % (prog, main), file=sys.stderr)
            return 2
        func = main.find_command(self.slaposha_command)[2]
        return main.run_command(func, parsed_args, prog=prog)


# (class name, slaposha command, the help line slapos prints): each class
# is a slapos.cli entry point of setup.py, named ``ha <last words>``.
COMMANDS = [
    ('StatusCommand', 'status', 'the cluster as a tree (slaposha status)'),
    ('MonCommand', 'mon', 'the cluster on one screen, redrawn as it changes'
     ' (slaposha mon)'),
    ('LogCommand', 'log', 'the decisions of an agent, oldest first (slaposha'
     ' log)'),
    ('StartCommand', 'start', 'start a service (slaposha start)'),
    ('StopCommand', 'stop', 'stop a service everywhere (slaposha stop)'),
    ('SwitchCommand', 'switch', 'planned move of a service to a host'
     ' (slaposha switch)'),
    ('TakeoverCommand', 'takeover', 'move a service to this host (slaposha'
     ' takeover)'),
    ('FreezeCommand', 'freeze', 'the agents neither start nor stop the'
     ' service (slaposha freeze)'),
    ('ThawCommand', 'thaw', 'undo freeze (slaposha thaw)'),
    ('CheckCommand', 'slapos check', 'check that this host may be a standby'
     ' of the node (slaposha slapos check)'),
    ('AdoptCommand', 'slapos adopt', 'put this host\'s SlapOS node under the'
     ' cluster\'s care (slaposha slapos adopt)'),
    ('PrepareStandbyCommand', 'slapos prepare-standby', 'make this host ready'
     ' to take over a node (slaposha slapos prepare-standby)'),
    ('ReleaseCommand', 'slapos release', 'give the adopted node back to'
     ' SlapOS on this host (slaposha slapos release)'),
    ('SnapshotsCommand', 'snapshots', 'the snapshots this host keeps of a'
     ' service (slaposha snapshots)'),
    ('RestoreCommand', 'restore', 'restore a service\'s data or one folder'
     ' from a snapshot (slaposha restore)'),
    ('ExportCommand', 'export', 'write a snapshot of a service to a file'
     ' (slaposha export)'),
    ('ImportCommand', 'import', 'read an export back among the snapshots'
     ' (slaposha import)'),
    ('DivergedListCommand', 'data diverged list', 'the diverged copies kept'
     ' on this host (slaposha data diverged list)'),
    ('DivergedDropCommand', 'data diverged drop', 'delete one diverged copy'
     ' of this host (slaposha data diverged drop)'),
]


def ha_name(slaposha_command):
    """What follows `slapos ha` for a slaposha command: `slapos check` is
    `slapos ha check`, `data diverged list` keeps its words."""
    if slaposha_command.startswith('slapos '):
        return slaposha_command[len('slapos '):]
    return slaposha_command


def _define(class_name, slaposha_command, doc):
    return type(class_name, (HaCommand,), {
        '__doc__': doc, 'slaposha_command': slaposha_command,
        '__module__': __name__})


for _name, _command, _doc in COMMANDS:
    globals()[_name] = _define(_name, _command, _doc)
del _name, _command, _doc

__all__ = ['HaCommand', 'COMMANDS'] + [name for name, _, _ in COMMANDS]
