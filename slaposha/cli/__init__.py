"""Command line: ``slaposha`` (and, with slapos.core, ``slapos ha``)."""

import sys


def main_module():
    """The running slaposha.cli.main, where commands register: `python -m
    slaposha.cli.main` runs it as __main__, and its commands are the ones
    to add to, not those of a second copy imported as slaposha.cli.main."""
    main = sys.modules.get('__main__')
    spec = getattr(main, '__spec__', None)
    if spec is not None and spec.name == 'slaposha.cli.main':
        return main
    from slaposha.cli import main
    return main
