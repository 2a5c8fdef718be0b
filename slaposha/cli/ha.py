"""``slapos ha ...``: the slaposha commands inside the slapos CLI.

Registered in setup.py's ``slapos.cli`` entry point group, so that an
operator who knows ``slapos node ...`` finds ``slapos ha status | switch |
takeover | freeze | thaw | check | adopt | prepare-standby | release`` in
``slapos --help``. Each one is the
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

__all__ = ['HaCommand', 'StatusCommand', 'SwitchCommand', 'TakeoverCommand',
           'FreezeCommand', 'ThawCommand', 'CheckCommand', 'AdoptCommand',
           'PrepareStandbyCommand', 'ReleaseCommand']

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
        prog = 'slapos ha %s' % self.slaposha_command.split()[-1]
        main = self._slaposha()
        if isinstance(main, ImportError):
            print('%s: slaposha cannot be loaded in this Python (%s): install'
                  ' slaposha with its dependencies beside slapos.core'
                  % (prog, main), file=sys.stderr)
            return 2
        func = main.find_command(self.slaposha_command)[2]
        return main.run_command(func, parsed_args, prog=prog)


class StatusCommand(HaCommand):
    """the cluster as a tree (slaposha status)"""
    slaposha_command = 'status'


class SwitchCommand(HaCommand):
    """planned move of a service to a host (slaposha switch)"""
    slaposha_command = 'switch'


class TakeoverCommand(HaCommand):
    """move a service to this host (slaposha takeover)"""
    slaposha_command = 'takeover'


class FreezeCommand(HaCommand):
    """the agents neither start nor stop the service (slaposha freeze)"""
    slaposha_command = 'freeze'


class ThawCommand(HaCommand):
    """undo freeze (slaposha thaw)"""
    slaposha_command = 'thaw'


class CheckCommand(HaCommand):
    """check that this host may be a standby of the node (slaposha slapos
    check)"""
    slaposha_command = 'slapos check'


class AdoptCommand(HaCommand):
    """put this host's SlapOS node under the cluster's care (slaposha
    slapos adopt)"""
    slaposha_command = 'slapos adopt'


class PrepareStandbyCommand(HaCommand):
    """make this host ready to take over a node (slaposha slapos
    prepare-standby)"""
    slaposha_command = 'slapos prepare-standby'


class ReleaseCommand(HaCommand):
    """give the adopted node back to SlapOS on this host (slaposha slapos
    release)"""
    slaposha_command = 'slapos release'
