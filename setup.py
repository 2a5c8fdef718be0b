"""slaposha: SlapOS compute nodes as highly available services."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, 'README.rst')) as f:
    long_description = f.read()

setup(
    name='slaposha',
    version='0.1.0.dev0',
    description='High availability for SlapOS compute nodes: leases on etcd, '
                'replicated partitions, takeover without redeploy.',
    long_description=long_description,
    long_description_content_type='text/x-rst',
    license='GPLv3+',
    python_requires='>=3.9',
    # The recipes live in the top-level recipes/ folder (as SlapOS
    # repositories keep them) but are importable as slaposha.recipes.
    packages=find_packages(include=['slaposha', 'slaposha.*'])
    + ['slaposha.recipes'],
    package_dir={'slaposha.recipes': 'recipes'},
    include_package_data=True,
    # What the HTTPS API and the portal serve (their OpenAPI descriptions,
    # their pages).
    package_data={'slaposha.api': ['openapi.json', 'ui.html'],
                  'slaposha.portal': ['openapi.json', 'page.html']},
    install_requires=[
        'requests',
        'lxml',
        'supervisor',
        # The cluster's PKI (slaposha.pki); 38 is Debian 12's.
        'cryptography>=38',
    ],
    extras_require={
        # The `slapos ha` commands plug into the slapos CLI of slapos.core.
        'slapos': ['slapos.core'],
        # The SlapOS tests run the real `slapos node format` and slapproxy:
        # on Python 3.11, slapos.core 1.26 loses its `node` commands
        # (reference/slapos-internals.md 7), 1.24.1 with setuptools<81 keeps
        # them; slapproxy needs slapos.libnetworkcache, undeclared.
        'test': ['pytest', 'pytest-timeout',
                 'slapos.core==1.24.1; python_version < "3.12"',
                 'setuptools<81; python_version < "3.12"',
                 'slapos.core>=1.26.1; python_version >= "3.12"',
                 'slapos.libnetworkcache',
                 # tests/test_packaging.py runs real buildouts offline with
                 # the recipes and the software release.
                 'zc.buildout', 'zc.recipe.egg', 'wheel',
                 # Fuzzes the HTTPS API from its OpenAPI description
                 # (tests/test_api.py); version 4 needs Python 3.11.
                 'schemathesis>=4,<5; python_version >= "3.11"',
                 # Fuzzes the replication receivers' framing
                 # (tests/test_wire_fuzz.py).
                 'hypothesis'],
    },
    entry_points={
        'console_scripts': [
            'slaposha = slaposha.cli.main:main',
        ],
        # `slapos ha ...`: the slaposha commands inside the slapos CLI.
        'slapos.cli': [
            'ha status = slaposha.cli.ha:StatusCommand',
            'ha switch = slaposha.cli.ha:SwitchCommand',
            'ha takeover = slaposha.cli.ha:TakeoverCommand',
            'ha freeze = slaposha.cli.ha:FreezeCommand',
            'ha thaw = slaposha.cli.ha:ThawCommand',
            'ha check = slaposha.cli.ha:CheckCommand',
            'ha adopt = slaposha.cli.ha:AdoptCommand',
            'ha prepare-standby = slaposha.cli.ha:PrepareStandbyCommand',
            'ha release = slaposha.cli.ha:ReleaseCommand',
            'ha mon = slaposha.cli.ha:MonCommand',
            'ha log = slaposha.cli.ha:LogCommand',
            'ha start = slaposha.cli.ha:StartCommand',
            'ha stop = slaposha.cli.ha:StopCommand',
            'ha snapshots = slaposha.cli.ha:SnapshotsCommand',
            'ha restore = slaposha.cli.ha:RestoreCommand',
            'ha export = slaposha.cli.ha:ExportCommand',
            'ha import = slaposha.cli.ha:ImportCommand',
            'ha data diverged list = slaposha.cli.ha:DivergedListCommand',
            'ha data diverged drop = slaposha.cli.ha:DivergedDropCommand',
        ],
        # Recipes of software/slaposha (recipes/, as slaposha.recipes).
        'zc.buildout': [
            'agent = slaposha.recipes.agent:Recipe',
            'witness = slaposha.recipes.agent:WitnessRecipe',
            'slap-configuration = slaposha.recipes.slapconfiguration:Recipe',
            'publish = slaposha.recipes.publish:Recipe',
            'template = slaposha.recipes.template:Recipe',
            'egg-link = slaposha.recipes.egglink:Recipe',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.9',
        'Operating System :: POSIX :: Linux',
        'Topic :: System :: Clustering',
    ],
)
