"""Command line: ``slaposha`` (and, with slapos.core, ``slapos ha``)."""
