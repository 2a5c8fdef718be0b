"""btrfs replication: full copy, incremental cycle, RPO (issue: data
replication).

Two lab hosts, each with its own btrfs file system on a loop device, the
volume /srv/slapgrid-fs/slapgrid, a receiver per host with TLS, as in
slaposha.lab.replication. The measurements:

1. Full copy of ``--size`` MB in ``--files`` files: a plain ``btrfs send |
   btrfs receive`` between the two hosts (a pipe: no network, no TLS, then
   a sync of the receiving file system) against the engine (Sender ->
   TLS -> Receiver, which syncs before it confirms), on the same snapshot;
   best of ``--runs`` each, and the ratio.
2. Incremental cycle after a 1 % change (1 % of the files get a 4 KiB
   overwrite): snapshot, send, prune; ``--cycles`` times.
3. RPO while an appender writes ``--rate`` MB/s (64 KiB records, each
   fsynced) and the ``btrfs`` driver runs (``--interval``,
   ``--min-interval``) for ``--seconds``: the loss window of snapshot k is
   when snapshot k+1 was confirmed by the standby minus when k was taken,
   i.e. what a crash at the worst moment loses (from the first incremental
   copy on: the first, full, copy catches up with what the appender wrote
   before). Beside it, the cost: CPU of the owner's process and its
   children (btrfs snapshot, send), from /proc/PID/stat, as a share of one
   core; what they read and wrote (/proc/PID/io); the writes of the
   owner's disk and the whole machine's CPU, against the same appender
   without replication (``--baseline`` s before); the receiver's CPU.
4. With ``--profile N``: where the time of a cycle goes, N cycles back to
   back under the same appender, each step of the sender (hA) and of the
   receiver (hB) timed (median, p90, mean CPU).

    .venv/bin/python benchmarks/replication.py [--size 512] [--seconds 30]
        [--only rpo,profile]

Prints each figure and the machine it ran on.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, wait_for  # noqa: E402
from slaposha.lab.replication import (  # noqa: E402
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
        from slaposha.replication.sender import Sender
        sender = Sender(%r, 1, [Peer('hB', %r, %d)], %r, 'hA')
        snap = sender.volume.get(%r)
        t = sender.send(sender.peers[0], snap)
        assert t.parent is None, t
        result = [t.seconds, t.bytes]
    ''' % (VOL, rl['hB'].address, PORT, rl.tls('hA'), name))
    rl.py('hB', '''
        from slaposha.replication.volume import Volume
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
        from slaposha.replication.sender import Sender
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


def usage(pid):
    """(CPU seconds, bytes read from storage, bytes written to it) of
    process ``pid`` and of its children that ended, from /proc."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    # utime, stime, cutime, cstime
    cpu = sum(int(x) for x in fields[11:15]) / os.sysconf('SC_CLK_TCK')
    io = {}
    with open('/proc/%d/io' % pid) as f:
        for line in f:
            key, _, value = line.partition(':')
            io[key] = int(value)
    return cpu, io['read_bytes'], io['write_bytes']


def busy():
    """CPU seconds the whole machine spent busy so far (/proc/stat: all
    but idle and I/O wait), kernel threads included."""
    with open('/proc/stat') as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / \
        os.sysconf('SC_CLK_TCK')


def disk_writes(device):
    """Bytes written to block device ``device`` (/dev/loopN) so far."""
    with open('/sys/block/%s/stat' % os.path.basename(device)) as f:
        return int(f.read().split()[6]) * 512


def rpo(rl, rate_mb, interval, min_interval, seconds, baseline):
    """Loss windows (s) of each cycle while the appender writes, the write
    rate it reached (MB/s), the cycles' durations, how many failed, and
    the cost: {owner: (CPU share of a core, MB/s read, MB/s written),
    receiver: CPU share, disk: (MB/s written with replication, without),
    machine: (CPU share of a core of the whole machine with replication,
    without)}. A rate of 0: no appender, the volume at rest.
    """
    size = 64 << 10
    disk = rl.disks['hA']
    writer, acks = rl.appender('hA', size, rate_mb * 1e6 / size,
                               data=VOL + '/appended') if rate_mb else \
        (None, None)
    time.sleep(1)
    before = disk_writes(disk), busy()
    time.sleep(baseline)
    alone = (disk_writes(disk) - before[0]) / baseline, \
        (busy() - before[1]) / baseline
    owner, report = rl.owner('hA', token=2, interval=interval,
                             min_interval=min_interval)
    # From its first cycle on: its start (imports) is not the rate's cost.
    wait_for(lambda: any('snapshot' in r for r in read_report(report)), 30,
             what='the first cycle')
    receiver = rl.receivers['hB'].pid
    began = time.monotonic(), usage(owner.pid), usage(receiver)[0], \
        disk_writes(disk), busy()
    time.sleep(seconds)
    ended = time.monotonic(), usage(owner.pid), usage(receiver)[0], \
        disk_writes(disk), busy()
    owner.terminate()
    if writer is not None:
        writer.kill()
        writer.wait()
    owner.wait(60)
    took = ended[0] - began[0]
    cost = {'owner': tuple((b - a) / took for a, b in zip(
        began[1], ended[1])), 'receiver': (ended[2] - began[2]) / took,
        'disk': ((ended[3] - began[3]) / took, alone[0]),
        'machine': ((ended[4] - began[4]) / took, alone[1])}
    cycles = [r for r in read_report(report) if 'hB' in r.get('sent', {})]
    # Not after the first copy, a full one of what the appender wrote
    # before the owner began: a catch-up, not the steady state.
    windows = [later['sent']['hB']['acked'] - earlier['created']
               for earlier, later in zip(cycles, cycles[1:])
               if earlier['sent']['hB']['parent'] is not None]
    reached = 0.0
    if acks is not None:
        with open(acks) as f:
            times = [float(line.split()[1]) for line in f
                     if line.endswith('\n')]
        reached = len(times) * size / (times[-1] - times[0]) / 1e6
    took = [r['seconds'] for r in cycles
            if r['sent']['hB']['parent'] is not None]
    failed = [r for r in read_report(report) if r.get('errors')]
    return windows, reached, took, len(failed), cost


# Timing wrappers put around the engine's steps in a profiled run: each
# call of a step appends (label, wall seconds, CPU seconds of the process
# and its children) to ``events``.
TIMED = textwrap.dedent('''\
    import contextlib, resource, sys, time
    from slaposha.replication import receiver, sender, volume
    events = []
    SAY = False  # a receiver says each step in its log
    def now():
        cpu = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            cpu += usage.ru_utime + usage.ru_stime
        return time.monotonic(), cpu
    def record(label, began):
        ended = now()
        event = (label, ended[0] - began[0], ended[1] - began[1])
        if SAY:
            sys.stderr.write('step %s %.6f %.6f\\n' % event)
            sys.stderr.flush()
        else:
            events.append(event)
    def timed(owner, name, label=None):
        inner = getattr(owner, name)
        def wrapper(*args, **kw):
            began = now()
            try:
                return inner(*args, **kw)
            finally:
                record(label(*args, **kw) if callable(label) else
                       label or name, began)
        setattr(owner, name, wrapper)
    def timed_state():
        inner = volume.locked_state
        @contextlib.contextmanager
        def wrapper(*args, **kw):
            began = now()
            with inner(*args, **kw) as state:
                record('state: lock, read', began)
                yield state
                began = now()
            record('state: write, fsync', began)
        volume.locked_state = wrapper
    def run_label(self, args, *rest, **kw):
        return 'btrfs ' + ' '.join(args[:2])
''')

# A receiver whose steps say how long they took, in its log.
PROFILED_RECEIVER = TIMED + textwrap.dedent('''\
    from slaposha.replication.__main__ import main
    SAY = True
    R, V = receiver.Receiver, volume.Volume
    for owner, name in ((R, '_list'), (R, '_stream'), (V, '_partial'),
                        (V, '_follow'), (V, '_write_meta'), (V, 'prune'),
                        (receiver, 'syncfs')):
        timed(owner, name)
    timed(V, '_run', run_label)
    timed_state()
    sys.exit(main(sys.argv[1:]))
''')

# (after TIMED) N cycles of a sender, each step timed.
PROFILED_SENDER = textwrap.dedent('''\
    from slaposha.replication import Peer
    S, V = sender.Sender, volume.Volume
    answers = []
    def answer_label(self, channel, peer, what):
        if what == 'list':
            return 'wait: list answered'
        answers.append(what)
        return 'wait: go' if len(answers) %% 2 else 'wait: received'
    for owner, name in ((S, 'cycle'), (V, 'snapshot'), (V, 'prune'),
                        (S, '_connect'), (S, '_estimate'), (S, '_stream'),
                        (S, '_confirmed'), (receiver, 'syncfs')):
        timed(owner, name)
    timed(S, '_answer', answer_label)
    timed(V, '_run', run_label)
    timed_state()
    sender = S(%(vol)r, 3, [Peer('hB', %(address)r, %(port)d)], %(tls)r, 'hA')
    result = []
    for _ in range(%(cycles)d):
        del events[:]
        cycle = sender.cycle()
        assert not cycle.errors, cycle.errors
        steps = {}
        for label, seconds, cpu in events:
            wall, used = steps.get(label, (0.0, 0.0))
            steps[label] = wall + seconds, used + cpu
        result.append(steps)
''')


def profile(rl, rate_mb, cycles):
    """Where a cycle's time goes: ``cycles`` cycles back to back under the
    appender; {'sender': [{step: (seconds, CPU seconds)} per cycle],
    'receiver': {step: [(seconds, CPU seconds) of each call]}}."""
    b = rl['hB']
    rl.stop_receivers()
    proc = b.spawn([sys.executable, '-c', PROFILED_RECEIVER, 'receiver',
                    '--host', 'hB', '--listen', b.address, '--port',
                    str(PORT), '--ssl-dir', rl.ssl_dir, VOL],
                   name='receiver-profiled', env=rl.env())
    rl.receivers['hB'] = proc
    wait_for(lambda: 'listening on' in rl.log('hB', 'receiver-profiled'),
             10, what='the profiled receiver')
    size = 64 << 10
    writer, _ = rl.appender('hA', size, rate_mb * 1e6 / size,
                            data=VOL + '/appended')
    try:
        sender = rl.py('hA', TIMED + PROFILED_SENDER % {
            'vol': VOL, 'address': b.address, 'port': PORT,
            'tls': rl.tls('hA'), 'cycles': cycles}, timeout=600)
    finally:
        writer.kill()
        writer.wait()
    receiver = {}
    for line in rl.log('hB', 'receiver-profiled').splitlines():
        if line.startswith('step '):
            label, seconds, cpu = line[5:].rsplit(' ', 2)
            receiver.setdefault(label, []).append((float(seconds),
                                                   float(cpu)))
    return {'sender': sender, 'receiver': receiver}


def print_profile(steps, cycles):
    """The profile as a table: step, calls per cycle, median and p90 of a
    cycle's share (sender) or of a call (receiver), and the CPU it used a
    cycle (mean), in ms."""
    print('  %-30s %6s %8s %8s %8s' % ('step', 'calls', 'p50 ms', 'p90 ms',
                                       'CPU ms'))
    for label, values in sorted(steps.items(),
                                key=lambda kv: -sum(w for w, _ in kv[1])):
        wall = [w for w, _ in values]
        print('  %-30s %6.1f %8.1f %8.1f %8.1f' % (
            label, len(values) / cycles, 1000 * statistics.median(wall),
            1000 * percentile(wall, 0.9),
            1000 * sum(c for _, c in values) / cycles))


PHASES = ('full', 'incremental', 'rpo', 'profile')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=512, help='MB of data')
    parser.add_argument('--files', type=int, default=5120)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--cycles', type=int, default=5)
    parser.add_argument('--rate', type=float, default=10.0, help='MB/s')
    parser.add_argument('--interval', type=float, default=1.0)
    parser.add_argument('--min-interval', type=float, default=None,
                        help='the driver\'s min_interval (default: its'
                        ' default)')
    parser.add_argument('--seconds', type=float, default=30.0)
    parser.add_argument('--baseline', type=float, default=10.0,
                        help='seconds of the appender alone, for the disk'
                        ' writes without replication')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='profile N cycles (0: no profile)')
    parser.add_argument('--only', default=','.join(PHASES),
                        help='the phases to run, of %s' % ','.join(PHASES))
    args = parser.parse_args()
    phases = set(args.only.split(','))
    if not phases <= set(PHASES):
        parser.error('--only: phases are %s' % ', '.join(PHASES))
    if not args.profile:
        phases.discard('profile')
    if 'incremental' in phases:
        phases.add('full')  # it needs the data and the base
    disk = '%dM' % max(1024, 3 * args.size + 512)
    with Lab(['hA', 'hB'], paths=LAB_PATHS) as lab:
        rl = ReplicationLab(lab, disk_size=disk)
        try:
            rl.receiver('hB')
            if 'full' in phases:
                full_and_incremental(rl, args, 'incremental' in phases)
            if 'rpo' in phases:
                windows, reached, cycle_times, failed, cost = rpo(
                    rl, args.rate, args.interval, args.min_interval,
                    args.seconds, args.baseline)
                print('RPO at %.1f MB/s of writes (asked %.0f), interval %g'
                      ' s, min_interval %s, %g s: loss window p50 %.2f s,'
                      ' p99 %.2f s, max %.2f s; snapshot to standby p50'
                      ' %.2f s, max %.2f s; %d snapshots sent, %d failed' % (
                          reached, args.rate, args.interval,
                          'default' if args.min_interval is None else
                          '%g s' % args.min_interval, args.seconds,
                          percentile(windows, 0.5),
                          percentile(windows, 0.99), max(windows),
                          percentile(cycle_times, 0.5), max(cycle_times),
                          len(cycle_times), failed))
                cpu, read, written = cost['owner']
                print('cost of it on the owner: %.1f %% of a core (process'
                      ' and children), read %.2f MB/s, wrote %.2f MB/s;'
                      ' its disk took %.1f MB/s of writes, %.1f MB/s'
                      ' without replication; the receiver: %.1f %% of a'
                      ' core; the whole machine (both hosts, kernel'
                      ' threads, anything else running): %.0f %% of a'
                      ' core, %.0f %% without replication' % (
                          100 * cpu, read / 1e6, written / 1e6,
                          cost['disk'][0] / 1e6, cost['disk'][1] / 1e6,
                          100 * cost['receiver'],
                          100 * cost['machine'][0],
                          100 * cost['machine'][1]))
                sys.stdout.flush()
            if 'profile' in phases:
                found = profile(rl, args.rate, args.profile)
                sender = {}
                for steps in found['sender']:
                    for label, spent in steps.items():
                        sender.setdefault(label, []).append(spent)
                print('profile of %d cycles back to back at %.0f MB/s of'
                      ' writes; the sender (time in a cycle):' % (
                          args.profile, args.rate))
                print_profile(sender, args.profile)
                print('the receiver (time of each call):')
                print_profile(found['receiver'], args.profile)
        finally:
            rl.stop_receivers()
    remove_mount_point()
    print('machine: %s, %d cores, Python %s, btrfs on loop devices (sparse'
          ' files on the root file system)' % (
              platform.platform(), os.cpu_count(),
              platform.python_version()))


def full_and_incremental(rl, args, increments):
    """Phases 1 and 2."""
    write_data(rl, args.size, args.files)
    name = rl.py('hA', '''
        from slaposha.replication.volume import Volume
        result = Volume(%r).snapshot(1, 'hA').name
    ''' % VOL)
    snapshot = rl.py('hA', '''
        from slaposha.replication.volume import Volume
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
    if not increments:
        return
    # The standby needs the base again for the increments.
    rl.py('hA', '''
        from slaposha.replication import Peer
        from slaposha.replication.sender import Sender
        sender = Sender(%r, 1, [Peer('hB', %r, %d)], %r, 'hA')
        sender.send(sender.peers[0], sender.volume.get(%r))
    ''' % (VOL, rl['hB'].address, PORT, rl.tls('hA'), name))
    steps = incremental(rl, args.files, args.cycles)
    took = [s for s, _ in steps]
    print('incremental cycle after a 1 %% change (%d x 4 KiB): median'
          ' %.2f s, max %.2f s, %.1f MB stream (%d cycles)' % (
              args.files // 100, statistics.median(took), max(took),
              statistics.median(b for _, b in steps) / 1e6, len(steps)))
    sys.stdout.flush()


if __name__ == '__main__':
    main()
