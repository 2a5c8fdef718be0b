"""``slaposha:egg-link``: let the partitions' offline buildouts find the
slaposha egg of the software release.

zc.buildout 5 and newer install every egg, wheels included, as a folder
with a ``.dist-info`` inside, and look into the eggs folder for those only
when they may install (not offline): a partition's buildout, always
offline, then has no distribution for its recipes
(reference/slapos-internals.md 8). A link in develop-eggs, which is read
offline too, makes the egg one more place to look.

Option: ``egg-directory`` (default: the folder the running slaposha was
installed in). Nothing is written when that folder is not in the eggs
folder of this buildout: a develop egg or the node's own Python is found
anyway.
"""

import os

__all__ = ['Recipe']


class Recipe(object):

    def __init__(self, buildout, name, options):
        import slaposha
        self.eggs = os.path.realpath(buildout['buildout']['eggs-directory'])
        self.develop = buildout['buildout']['develop-eggs-directory']
        options.setdefault('egg-directory', os.path.dirname(
            os.path.dirname(os.path.abspath(slaposha.__file__))))
        self.options = options

    def install(self):
        egg = os.path.realpath(self.options['egg-directory'])
        if os.path.dirname(egg) != self.eggs:
            return []
        os.makedirs(self.develop, exist_ok=True)
        path = os.path.join(self.develop, 'slaposha.egg-link')
        with open(path, 'w') as f:
            f.write(egg + '\n.\n')
        return [path]

    update = install
