"""The slaposha software release built from this checkout, offline.

software/slaposha/software.cfg takes the slaposha egg from the package
index unless [slaposha-source] says otherwise; a node that builds from this
checkout (the tests, the lab's SlapOS node) is given a profile that extends
it with a folder of wheels::

    wheels = build_wheel(os.path.join(work, 'wheels'))
    url = local_release(os.path.join(work, 'sr'), find_links=wheels)
    # `slapos supply <url> ...`, or buildout -o with extends = <url>

The other eggs (requests, lxml, supervisor, cryptography, zc.recipe.egg)
come from the Python that runs buildout, or from the same folder.
"""

import os
import shutil
import subprocess
import sys
import tempfile

__all__ = ['SOFTWARE', 'build_wheel', 'local_release']

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SOFTWARE = os.path.join(TOP, 'software', 'slaposha', 'software.cfg')

# What the slaposha distribution is made of (setup.py).
SOURCES = ('setup.py', 'setup.cfg', 'README.rst', 'slaposha', 'recipes')


def build_wheel(folder, python=sys.executable):
    """A wheel of this checkout in ``folder`` (made from a copy, so that the
    build leaves nothing in the checkout others work in); returns
    ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, 'slaposha')
        os.makedirs(source)
        for name in SOURCES:
            path = os.path.join(TOP, name)
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(source, name),
                                ignore=shutil.ignore_patterns(
                                    '__pycache__', '*.pyc', '*.egg-info'))
            else:
                shutil.copy2(path, source)
        p = subprocess.run(
            [python, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
             '--no-build-isolation', '--no-index', '--wheel-dir', folder,
             source], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True)
        if p.returncode:
            raise RuntimeError('cannot build the slaposha wheel: %s'
                               % p.stdout.strip()[-800:])
    return folder


def local_release(folder, find_links=None, develop=None, software=SOFTWARE):
    """Write ``folder``/software.cfg: software/slaposha/software.cfg with
    the slaposha egg from ``find_links`` (a folder of wheels) or
    ``develop`` (a checkout); returns its path, the release's URL."""
    os.makedirs(folder, exist_ok=True)
    lines = ['# software/slaposha built from a local source.',
             '[buildout]', 'extends = %s' % software]
    if find_links:
        # Nothing from the network: the index is the folder of wheels too
        # (buildout -o would install nothing at all, not even from there).
        lines += ['index = file://%s' % os.path.abspath(find_links),
                  'newest = false']
    lines += ['', '[slaposha-source]']
    if find_links:
        lines.append('find-links = %s' % find_links)
    if develop:
        lines.append('develop = %s' % develop)
    path = os.path.join(folder, 'software.cfg')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path
