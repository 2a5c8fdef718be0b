"""zc.buildout recipes of slaposha, importable as ``slaposha.recipes``.

They turn a SlapOS master's instance parameters into an agent or witness
configuration; each one is registered in setup.py's ``zc.buildout`` group.
"""
