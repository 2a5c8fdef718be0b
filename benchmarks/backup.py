"""What exports, imports and a whole-service restore cost (issue 17).

Part ``export``: two lab hosts with btrfs disks, no agents (the lab of the
replication tests). hA's volume holds ``--size`` MB of incompressible data
(a database's files) and 1/8 of that in text (logs, configuration). Timed,
with the size written: a full export of a snapshot (``slaposha export``:
btrfs send, zstd, sha256), an incremental export after ``--change`` % of the
data was rewritten, and the import of both, in order, on hB, a host that
never had the service (checksum, btrfs receive, renamed to token 0).

Part ``restore``: the agents of hA and hB, a service whose btrfs volume is
replicated every 0.5 s while a writer appends records to it. ``slaposha
restore web --at`` a time 10 s back, asked on the standby: the command's
time, and how long the writer was seen nowhere (polled from outside every
host every 20 ms): the service is stopped, the live volume set aside, the
snapshot made live, the service started.

    /work/bin/labslot --exclusive .venv/bin/python benchmarks/backup.py
        [--part export|restore|both] [--size 256] [--change 5] [--runs 3]
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, wait_for  # noqa: E402
from slaposha.lab.cluster import LabCluster, Observer  # noqa: E402
from slaposha.lab.replication import (  # noqa: E402
    LAB_PATHS, VOL, ReplicationLab, record_writer, remove_mount_point)

SERVICE = '''
    [service]
    hosts = hA hB
    [btrfs#data]
    volume = %s
    interval = 0.5
    keep = 100
    [app#writer]
    command = exec python3 -u %s %s
'''


def cli(host, env, *args):
    command = [sys.executable, '-m', 'slaposha.cli.main'] + list(args)
    began = time.monotonic()
    p = host.run(command, env=env, check=False, timeout=600)
    if p.returncode:
        raise SystemExit('slaposha %s: %s' % (' '.join(args),
                                              p.stderr.strip()))
    return time.monotonic() - began, p.stdout


def snapshot(pair, token):
    return pair.py('hA', '''
        from slaposha.replication.volume import Volume
        result = Volume(%r).snapshot(%d, 'hA').name
    ''' % (VOL, token))


def export_part(size, change):
    rows = []
    with Lab(['hA', 'hB'], paths=LAB_PATHS) as lab:
        disk = '%dM' % max(512, size * 4)
        pair = ReplicationLab(lab, disk_size=disk)
        a, b = pair['hA'], pair['hB']
        svc = os.path.join(lab.workdir, 'comp.cfg')
        with open(svc, 'w') as f:
            f.write('[btrfs#data]\nvolume = %s\n' % VOL)
        exports = os.path.join(lab.workdir, 'exports')
        os.makedirs(exports)
        a.run('mkdir -p {v}/slappart0/log && dd if=/dev/urandom'
              ' of={v}/slappart0/db bs=1M count={n} status=none && for i in'
              ' $(seq {t}); do seq 1 120000 > {v}/slappart0/log/$i.log;'
              ' done && sync'.format(v=VOL, n=size, t=max(1, size // 8)))
        first = snapshot(pair, 10)
        took, out = cli(a, pair.env(), 'export', svc, '--to', exports)
        rows.append(('export, full', took, newest(exports)))
        changed = max(1, size * change // 100)
        a.run('dd if=/dev/urandom of={v}/slappart0/db bs=1M count={c}'
              ' seek={s} conv=notrunc status=none && sync'.format(
                  v=VOL, c=changed, s=size // 3))
        second = snapshot(pair, 10)
        took, out = cli(a, pair.env(), 'export', svc, '--to', exports,
                        '--incremental')
        rows.append(('export, incremental (%d MB rewritten)' % changed,
                      took, newest(exports)))
        full, incremental = sorted(
            (os.path.join(exports, n) for n in os.listdir(exports)
             if n.endswith('.zst')), key=os.path.getmtime)
        took, _ = cli(b, pair.env(), 'import', svc, full)
        rows.append(('import, full', took, os.path.getsize(full)))
        took, _ = cli(b, pair.env(), 'import', svc, incremental)
        rows.append(('import, incremental', took,
                     os.path.getsize(incremental)))
        print('  exported %s then %s, both imported on hB' % (first, second))
    remove_mount_point()
    return rows


def newest(folder):
    paths = [os.path.join(folder, n) for n in os.listdir(folder)
             if n.endswith('.zst')]
    return os.path.getsize(max(paths, key=os.path.getmtime))


class Absence(object):
    """Where the writer runs, looked at from outside every host every
    20 ms in a thread: the longest time it was seen nowhere."""

    def __init__(self, observer, hosts):
        self.observer, self.hosts = observer, hosts
        self.samples = []   # (monotonic time, hosts where it runs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        lab = self.observer.lab
        while not self._stop.wait(0.02):
            self.samples.append((time.monotonic(), [
                h for h in self.hosts if self.observer.running_on(lab[h])]))

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def longest(self, since):
        """Seconds, the longest run of looks finding it nowhere after
        ``since`` (from the last look that found it to the next one);
        raises if it was seen on two hosts at once."""
        longest, last_seen = 0.0, None
        for t, where in self.samples:
            if t < since:
                continue
            if len(where) > 1:
                raise SystemExit('seen on %s at once' % ' and '.join(where))
            if where:
                if last_seen is not None:
                    longest = max(longest, t - last_seen)
                last_seen = t
        return longest


def restore_part(runs):
    figures = []
    with Lab(['hA', 'hB', 'hW'], paths=LAB_PATHS) as lab:
        ReplicationLab(lab, disk_size='512M')
        writer = os.path.join(lab.workdir, 'writer.py')
        with open(writer, 'w') as f:
            f.write(record_writer(VOL))
        marker = str(86400 + int(lab.id, 16))
        lc = LabCluster(lab, ['hA', 'hB'], ['hW'], tls=True,
                        services={'web': SERVICE % (VOL, writer, marker)})
        lc.start()
        absence = Absence(Observer(lab, marker), ['hA', 'hB'])
        try:
            wait_for(lambda: lc.owner('web', 'hW')[0] is not None, 60,
                     interval=0.5, what='web running')
            absence.start()
            for _ in range(runs):
                owner = lc.owner('web', 'hW')[0]
                standby = 'hB' if owner == 'hA' else 'hA'
                lc.wait_standby(standby, 'btrfs#data')
                time.sleep(12)
                at = datetime.datetime.fromtimestamp(
                    time.time() - 10, datetime.timezone.utc).strftime(
                        '%Y-%m-%d %H:%M:%S')
                began = time.monotonic()
                p = lc.cli(standby, 'restore', 'web', '--at', at, '--yes',
                           check=False, timeout=600)
                took = time.monotonic() - began
                if p.returncode:
                    raise SystemExit('restore: %s' % p.stderr.strip())
                wait_for(lambda: any(where for _, where in
                                     absence.samples[-3:]), 30,
                         interval=0.1, what='the writer running again')
                time.sleep(1)
                figures.append((took, absence.longest(began)))
                print('  restore --at %s on %s: %.2f s, writer seen nowhere'
                      ' for %.2f s\n    %s' % (
                          at, owner, took, figures[-1][1],
                          '\n    '.join(p.stdout.strip().splitlines())))
        finally:
            absence.stop()
            for host in ('hA', 'hB'):
                lc.stop_agent(host)
    remove_mount_point()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--part', choices=('export', 'restore', 'both'),
                        default='both')
    parser.add_argument('--size', type=int, default=256,
                        help='MB of incompressible data (default 256)')
    parser.add_argument('--change', type=int, default=5,
                        help='%% of it rewritten before the incremental'
                        ' export (default 5)')
    parser.add_argument('--runs', type=int, default=3,
                        help='restores to time (default 3)')
    args = parser.parse_args()
    if args.part in ('export', 'both'):
        print('export and import, %d MB of data + %d MB of text:'
              % (args.size, max(1, args.size // 8)))
        for what, took, size in export_part(args.size, args.change):
            print('  %-40s %6.2f s  %8.1f MB  %6.1f MB/s' % (
                what, took, size / 1e6, size / 1e6 / took))
    if args.part in ('restore', 'both'):
        print('restore --at, the whole service, under a writer:')
        figures = restore_part(args.runs)
        print('  median: command %.2f s, writer seen nowhere %.2f s;'
              ' max %.2f s / %.2f s' % (
                  statistics.median(f[0] for f in figures),
                  statistics.median(f[1] for f in figures),
                  max(f[0] for f in figures), max(f[1] for f in figures)))
    print('machine: %s, %d cores, Python %s' % (
        platform.platform(), os.cpu_count(), platform.python_version()))


if __name__ == '__main__':
    main()
