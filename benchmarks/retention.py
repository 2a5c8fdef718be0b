"""The cost of keeping snapshots as backups (issue 17): cycle time and disk.

Two lab hosts as in slaposha.lab.replication (btrfs on loop devices, a
receiver per host with TLS, the ``btrfs`` driver as the owner on hA). A
writer overwrites random 64 KiB blocks of a ``--file`` MB file at
``--rate`` MB/s, each fsynced (a database rewriting its pages: the worst
case for retention, since every kept snapshot holds the old blocks), for
``--seconds``, once with retention off (minutely, hourly, daily, weekly =
0) and once with the defaults (10, 24, 7, 4), each on fresh file systems.
Printed for each: replication cycles (snapshot, send, prune) done, their
median and p90 seconds, the snapshots each host holds at the end and the
space used on each file system (``btrfs filesystem usage``).

    /work/bin/labslot --exclusive .venv/bin/python benchmarks/retention.py
        [--seconds 180] [--rate 50] [--file 256]
"""

import argparse
import os
import platform
import statistics
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, wait_for  # noqa: E402
from slaposha.lab.replication import (  # noqa: E402
    FS, LAB_PATHS, VOL, ReplicationLab, read_report, remove_mount_point)

OVERWRITER = textwrap.dedent('''\
    import os, random, sys, time
    path, size, rate = sys.argv[1], int(sys.argv[2]) << 20, float(sys.argv[3])
    block = 64 << 10
    with open(path, 'wb') as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    print('ready', flush=True)
    fd = os.open(path, os.O_WRONLY)
    start, n = time.monotonic(), 0
    while True:
        os.pwrite(fd, os.urandom(block),
                  random.randrange(size // block) * block)
        os.fsync(fd)
        n += 1
        delay = start + n * block / (rate * (1 << 20)) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
''')

MODES = [('off', {'minutely': 0, 'hourly': 0, 'daily': 0, 'weekly': 0}),
         ('default', {'minutely': 10, 'hourly': 24, 'daily': 7,
                      'weekly': 4})]


def used(host):
    p = host.run(['btrfs', 'filesystem', 'usage', '-b', FS])
    for line in p.stdout.splitlines():
        if line.strip().startswith('Used:'):
            return int(line.split()[1])
    return None


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(mode, options, args):
    with Lab(['hA', 'hB'], paths=LAB_PATHS) as lab:
        rl = ReplicationLab(lab, disk_size='%dM' % args.disk)
        try:
            rl.receiver('hB', retention='%(minutely)d,%(hourly)d,%(daily)d,'
                        '%(weekly)d' % options)
            writer = rl['hA'].spawn(
                [sys.executable, '-c', OVERWRITER, VOL + '/db',
                 str(args.file), str(args.rate)], name='writer',
                env=rl.env())
            wait_for(lambda: 'ready' in rl.log('hA', 'writer'), 120,
                     what='the file written')
            owner, report = rl.owner('hA', token=10, interval=1.0,
                                     options=options)
            began = time.time()
            time.sleep(args.seconds)
            cycles = [r for r in read_report(report)
                      if r.get('sent') and r['created'] >= began + 10]
            owner.terminate()
            owner.wait(60)
            writer.kill()
            writer.wait()
            seconds = [r['seconds'] for r in cycles]
            errors = sum(1 for r in read_report(report) if r.get('errors'))
            held = {h: len(rl.status(h)['snapshots']) for h in ('hA', 'hB')}
            space = {h: used(rl[h]) for h in ('hA', 'hB')}
        finally:
            rl.stop_receivers()
    print('retention %-8s %d cycles after the first 10 s, median %.3f s,'
          ' p90 %.3f s, max %.3f s; %d with an error; snapshots held hA %d,'
          ' hB %d; disk used hA %.0f MB, hB %.0f MB' % (
              mode, len(seconds), statistics.median(seconds),
              percentile(seconds, 0.9), max(seconds), errors, held['hA'],
              held['hB'], space['hA'] / 1e6, space['hB'] / 1e6), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seconds', type=float, default=180.0)
    parser.add_argument('--rate', type=float, default=50.0, help='MB/s')
    parser.add_argument('--file', type=int, default=256, help='MB')
    parser.add_argument('--disk', type=int, default=6144, help='MB')
    parser.add_argument('--modes', default='off,default')
    args = parser.parse_args()
    print('%s, %d cores, kernel %s, %s; %s MB/s of 64 KiB overwrites of a'
          ' %d MB file for %g s' % (
              time.strftime('%Y-%m-%d %H:%M'), os.cpu_count(),
              platform.release(), platform.python_version(), args.rate,
              args.file, args.seconds), flush=True)
    try:
        for mode, options in MODES:
            if mode in args.modes.split(','):
                run(mode, options, args)
    finally:
        remove_mount_point()


if __name__ == '__main__':
    main()
