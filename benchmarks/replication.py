"""btrfs replication: full copy, incremental cycle, RPO (issue: data
replication).

Two lab hosts, each with its own btrfs file system on a loop device, the
volume /srv/slapgrid-fs/slapgrid, a receiver per host with TLS, as in
slaposha.replication.lab. Three measurements:

1. Full copy of ``--size`` MB in ``--files`` files: a plain ``btrfs send |
   btrfs receive`` between the two hosts (a pipe: no network, no TLS, then
   a sync of the receiving file system) against the engine (Sender ->
   TLS -> Receiver, which syncs before it confirms), on the same snapshot;
   best of ``--runs`` each, and the ratio.
2. Incremental cycle after a 1 % change (1 % of the files get a 4 KiB
   overwrite): snapshot, send, prune; ``--cycles`` times.
3. RPO while an appender writes ``--rate`` MB/s (64 KiB records, each
   fsynced) and the ``btrfs`` driver runs every ``--interval`` s for
   ``--seconds``: the loss window of cycle k is when snapshot k+1 was
   confirmed by the standby minus when snapshot k was taken, i.e. what a
   crash at the worst moment loses.

    .venv/bin/python benchmarks/replication.py [--size 512] [--seconds 30]

Prints each figure and the machine it ran on.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab  # noqa: E402
from slaposha.replication.lab import (  # noqa: E402
    FS, LAB_PATHS, PORT, VOL, ReplicationLab, read_report,
    remove_mount_point)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def inside(host, args):
    """A command line run in ``host``'s namespaces, for a pipe between two
    hosts made here."""
    return ['nsenter', '--net=%s' % host.net_path,
            '--mount=%s' % host.mnt_path, '--'] + list(args)


def write_data(rl, size_mb, files):
    per_file = size_mb * (1 << 20) // files
    rl.py('hA', '''
        import os
        for i in range(%d):
            folder = '%s/data/%%03d' %% (i // 1000)
            os.makedirs(folder, exist_ok=True)
            with open('%%s/f%%05d' %% (folder, i), 'wb') as f:
                f.write(os.urandom(%d))
        os.sync()
    ''' % (files, VOL, per_file))


def plain_copy(rl, snapshot, run):
    """``btrfs send | btrfs receive`` from hA to hB, then a sync of hB's
    file system; (seconds, bytes on hB)."""
    a, b = rl['hA'], rl['hB']
    target = '%s/plain-%d' % (FS, run)
    b.run(['mkdir', '-p', target])
    started = time.monotonic()
    send = subprocess.Popen(inside(a, ['btrfs', 'send', '-q', snapshot]),
                            stdout=subprocess.PIPE)
    receive = subprocess.Popen(inside(b, ['btrfs', 'receive', '-q', target]),
                               stdin=send.stdout)
    send.stdout.close()
    if receive.wait() or send.wait():
        raise SystemExit('plain btrfs send | receive failed')
    b.run(['btrfs', 'filesystem', 'sync', FS])
    seconds = time.monotonic() - started
    b.run(['btrfs', 'subvolume', 'delete', '%s/%s' % (
        target, os.path.basename(snapshot))])
    return seconds


def engine_copy(rl, name):
    """The Sender's full send of snapshot ``name`` to hB's Receiver:
    (seconds, bytes); hB's copy is deleted afterwards."""
    seconds, sent = rl.py('hA', '''
        from slaposha.replication import Peer
        from slaposha.replication.btrfs import Sender
        sender = Sender(%r, 1, [Peer('hB', %r, %d)], %r, 'hA')
        snap = sender.volume.get(%r)
        t = sender.send(sender.peers[0], snap)
        assert t.parent is None, t
        result = [t.seconds, t.bytes]
    ''' % (VOL, rl['hB'].address, PORT, rl.tls('hA'), name))
    rl.py('hB', '''
        from slaposha.replication.btrfs import Volume
        volume = Volume(%r)
        volume._delete_subvolume(volume.get(%r).path, 'delete')
        volume._drop_meta(%r)
    ''' % (VOL, name, name))
    return seconds, sent


def incremental(rl, files, cycles):
    """``cycles`` times: 1 % of the files get a 4 KiB overwrite, then one
    cycle; [(seconds, bytes)]."""
    return rl.py('hA', '''
        import os, random, glob
        from slaposha.replication import Peer
        from slaposha.replication.btrfs import Sender
        sender = Sender(%r, 1, [Peer('hB', %r, %d)], %r, 'hA')
        names = sorted(glob.glob(%r + '/data/*/*'))
        result = []
        for _ in range(%d):
            for path in random.sample(names, max(1, len(names) // 100)):
                with open(path, 'r+b') as f:
                    f.seek(random.randrange(os.path.getsize(path) - 4096))
                    f.write(os.urandom(4096))
            os.sync()
            cycle = sender.cycle()
            assert not cycle.errors, cycle.errors
            t = cycle.results['hB']
            assert t.parent is not None, t
            result.append([cycle.seconds, t.bytes])
    ''' % (VOL, rl['hB'].address, PORT, rl.tls('hA'), VOL, cycles))


def rpo(rl, rate_mb, interval, seconds):
    """Loss windows (s) of each cycle while the appender writes, and the
    write rate it reached (MB/s)."""
    size = 64 << 10
    writer, acks = rl.appender('hA', size, rate_mb * 1e6 / size,
                               data=VOL + '/appended')
    owner, report = rl.owner('hA', token=2, interval=interval)
    time.sleep(seconds)
    owner.terminate()
    writer.kill()
    owner.wait(60)
    writer.wait()
    cycles = [r for r in read_report(report) if 'hB' in r.get('sent', {})]
    windows = [later['sent']['hB']['acked'] - earlier['created']
               for earlier, later in zip(cycles, cycles[1:])]
    with open(acks) as f:
        times = [float(line.split()[1]) for line in f if line.endswith('\n')]
    reached = len(times) * size / (times[-1] - times[0]) / 1e6
    took = [r['seconds'] for r in cycles]
    failed = [r for r in read_report(report) if r.get('errors')]
    return windows, reached, took, len(failed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=512, help='MB of data')
    parser.add_argument('--files', type=int, default=5120)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--cycles', type=int, default=5)
    parser.add_argument('--rate', type=float, default=10.0, help='MB/s')
    parser.add_argument('--interval', type=float, default=1.0)
    parser.add_argument('--seconds', type=float, default=30.0)
    args = parser.parse_args()
    disk = '%dM' % max(1024, 3 * args.size + 512)
    with Lab(['hA', 'hB'], paths=LAB_PATHS) as lab:
        rl = ReplicationLab(lab, disk_size=disk)
        try:
            rl.receiver('hB')
            write_data(rl, args.size, args.files)
            name = rl.py('hA', '''
                from slaposha.replication.btrfs import Volume
                result = Volume(%r).snapshot(1, 'hA').name
            ''' % VOL)
            snapshot = rl.py('hA', '''
                from slaposha.replication.btrfs import Volume
                result = Volume(%r).get(%r).path
            ''' % (VOL, name))
            plain, ours = [], []
            for run in range(args.runs):
                plain.append(plain_copy(rl, snapshot, run))
                seconds, sent = engine_copy(rl, name)
                ours.append(seconds)
                print('full copy run %d: plain send|receive %.2f s, engine'
                      ' %.2f s (%d MB stream)' % (run + 1, plain[-1],
                                                   seconds, sent / 1e6))
                sys.stdout.flush()
            mb = sent / 1e6
            print('full copy of %d MB in %d files: plain %.0f MB/s, engine'
                  ' %.0f MB/s over TLS: ratio %.2f (best of %d)' % (
                      args.size, args.files, mb / min(plain),
                      mb / min(ours), min(plain) / min(ours), args.runs))
            # The standby needs the base again for the increments.
            rl.py('hA', '''
                from slaposha.replication import Peer
                from slaposha.replication.btrfs import Sender
                sender = Sender(%r, 1, [Peer('hB', %r, %d)], %r, 'hA')
                sender.send(sender.peers[0], sender.volume.get(%r))
            ''' % (VOL, rl['hB'].address, PORT, rl.tls('hA'), name))
            steps = incremental(rl, args.files, args.cycles)
            took = [s for s, _ in steps]
            print('incremental cycle after a 1 %% change (%d x 4 KiB): median'
                  ' %.2f s, max %.2f s, %.1f MB stream (%d cycles)' % (
                      args.files // 100, statistics.median(took), max(took),
                      statistics.median(b for _, b in steps) / 1e6,
                      len(steps)))
            sys.stdout.flush()
            windows, reached, cycle_times, failed = rpo(
                rl, args.rate, args.interval, args.seconds)
            print('RPO at %.1f MB/s of writes (asked %.0f), interval %g s,'
                  ' %g s: loss window p50 %.2f s, p99 %.2f s, max %.2f s;'
                  ' cycle p50 %.2f s, max %.2f s; %d cycles, %d failed' % (
                      reached, args.rate, args.interval, args.seconds,
                      percentile(windows, 0.5), percentile(windows, 0.99),
                      max(windows), percentile(cycle_times, 0.5),
                      max(cycle_times), len(cycle_times), failed))
        finally:
            rl.stop_receivers()
    remove_mount_point()
    print('machine: %s, %d cores, Python %s, btrfs on loop devices (sparse'
          ' files on the root file system)' % (
              platform.platform(), os.cpu_count(),
              platform.python_version()))


if __name__ == '__main__':
    main()
