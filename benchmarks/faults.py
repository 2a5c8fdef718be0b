"""The randomized fault suite as a benchmark: many iterations, the table
of takeover times per fault type and the count of each audit violation
(see slaposha.lab.faults for the faults and the audits).

    .venv/bin/python benchmarks/faults.py --iterations 200 --seed 1

With ``--logs DIR`` the hosts' logs (agents, witnesses, the writer) are
copied there before the lab goes, to read what led to a violation.
"""

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab  # noqa: E402
from slaposha.lab.faults import LAB_HOSTS, LAB_PATHS, FaultSuite  # noqa: E402,E501


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iterations', type=int, default=200)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--logs', metavar='DIR',
                        help='keep the hosts\' logs in this folder')
    args = parser.parse_args()
    with Lab(LAB_HOSTS, paths=LAB_PATHS) as lab:
        suite = FaultSuite(lab, args.seed)
        suite.start()
        try:
            for _ in range(args.iterations):
                suite.step()
        finally:
            suite.stop()
            if args.logs:
                suite.save_logs(args.logs)
    print(suite.report())
    print('seed %d; machine: %s, %d cores, Python %s' % (
        args.seed, platform.platform(), os.cpu_count(),
        platform.python_version()))
    return 1 if any(suite.violations.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
