"""Timing of rebasin.py: permutation spec + weight matching of two networks, and MergeMany of N, for
airbench and resnet18 at width 1 on CIFAR-shaped inputs. Prints one table row per measurement.

    python benchmarks/bench_rebasin.py                       # both architectures, N = 12
    python benchmarks/bench_rebasin.py --arch airbench --threads 1 --models 4
    # scale: torchvision's ResNet-50 pair, 25.6M parameters
    python benchmarks/bench_rebasin.py --arch resnet50 --threads 1
    # a ViT-B/16-sized pair, and the peer
    python benchmarks/bench_rebasin.py --arch vit-b16 --threads 1 --peer /tmp/peer-lib

Networks are freshly initialized members (train_ensemble.init_member, different seeds): timing depends on
sizes and sweep counts, not on training. Three pairs: two inits (airbench's identity-initialized convs make
this easy); 'planted', B = π(A) + noise at half the weights' scale (a known answer); 'gaussian', every
tensor replaced by noise of its own scale (no structure to find: the most sweeps and passes). MergeMany runs
on N inits and on N gaussian networks. The load average is printed because other processes skew CPU timings.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rebasin  # noqa: E402
import train_ensemble as te  # noqa: E402
from snimu_rebasin import large_pair  # noqa: E402


def networks(arch, count, width=1.0):
    spec = dict(arch=arch, in_channels=3, image_size=32, num_classes=10, width=width, kernel_size=3,
                mean=[0.5] * 3, std=[0.25] * 3)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return spec, [te.init_member(spec, seed, x) for seed in range(count)]


def planted(spec_, state, seed=1):
    """B = π(A) + noise with half the per-tensor standard deviation of A."""
    g = torch.Generator().manual_seed(seed)
    noisy = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
             for k, v in state.items()}
    return rebasin.apply_permutation(spec_, rebasin.random_permutation(spec_, seed), noisy)


def gaussian(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
            for k, v in state.items()}


def scale(arch, device):
    """Spec tracing + weight matching of a large pair (snimu_rebasin.large_pair), and the process's peak
    memory (run it alone: the peak is the whole process's, the two networks included)."""
    import resource
    model_a, model_b, x = large_pair(arch)
    start = time.perf_counter()
    spec = rebasin.permutation_spec(model_a, x)
    spec_s = time.perf_counter() - start
    perm = rebasin.weight_matching(spec, model_a.state_dict(), model_b.state_dict(), device=device)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    print(f'{arch:10} {"match 2 inits":22} {seconds:8.2f} {spec_s:7.2f} {len(perm.objective) - 1:14d}  '
          f'{len(spec.perms)} permutations, {sum(p.numel() for p in model_a.parameters()) / 1e6:.1f}M parameters, '
          f'peak memory {peak:.2f} GiB', flush=True)


def peer(arch, directory, timeout, memory_gib):
    """The same job by snimu/rebasin, installed in `directory`, in a child process (snimu_rebasin.py) that is
    stopped after `timeout` seconds or above `memory_gib` of resident memory; prints its row or its failure."""
    worker = Path(__file__).with_name('snimu_rebasin.py')
    env = dict(os.environ, PYTHONPATH=str(Path(directory).resolve()), OMP_NUM_THREADS='1')
    start, peak, failure = time.perf_counter(), 0.0, None
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        child = subprocess.Popen([sys.executable, str(worker), arch], stdout=out, stderr=err, env=env,
                                 cwd=tempfile.gettempdir())
        while child.poll() is None:
            time.sleep(0.5)
            try:
                rss = int(Path(f'/proc/{child.pid}/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE')
            except (OSError, IndexError):
                continue
            peak = max(peak, rss / 2**30)
            if time.perf_counter() - start > timeout or peak > memory_gib:
                child.kill()
                child.wait()
                failure = (f'stopped: over {memory_gib:g} GiB of memory' if peak > memory_gib
                           else f'stopped: not done in {timeout:g} s')
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith('{')]
        if failure is None and (child.returncode or not lines):
            tail = [line for line in err.read().splitlines() if line.strip()]
            failure = f'failed (exit {child.returncode}): {tail[-1] if tail else "no output"}'
    if failure:
        print(f'{arch:10} {"snimu/rebasin":22} {time.perf_counter() - start:8.1f} {"":7} {"":14}  {failure}, '
              f'peak memory {peak:.2f} GiB', flush=True)
        return
    result = json.loads(lines[-1])
    print(f'{arch:10} {"snimu/rebasin":22} {result["seconds"]:8.2f} {result["trace_s"]:7.2f} {"":14}  '
          f'peak memory {max(peak, result["peak_gib"]):.2f} GiB', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', choices=['airbench', 'resnet18', 'resnet50', 'vit-b16', 'all'], default='all',
                        help="'all' is airbench and resnet18; resnet50 and vit-b16 (the scale test) run alone")
    parser.add_argument('--peer', metavar='DIR', help='scale test: also run snimu/rebasin, installed in DIR '
                        '(pip install --target DIR rebasin==0.0.47 torchview graphviz tqdm --no-deps)')
    parser.add_argument('--peer-timeout', type=float, default=600, help='seconds before the peer is stopped')
    parser.add_argument('--peer-memory', type=float, default=16, help='GiB of memory above which the peer is stopped')
    parser.add_argument('--models', type=int, default=12, help='networks merged by MergeMany (0 skips it)')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; 1 is steadier on a busy machine)")
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'device {args.device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, '
          f'torch {torch.__version__}')
    print(f"{'arch':10} {'case':22} {'seconds':>8} {'spec s':>7} {'sweeps/passes':>14}  result")
    if args.arch in ('resnet50', 'vit-b16'):
        scale(args.arch, args.device)
        if args.peer:
            peer(args.arch, args.peer, args.peer_timeout, args.peer_memory)
        return
    for arch in (['airbench', 'resnet18'] if args.arch == 'all' else [args.arch]):
        spec, nets = networks(arch, max(2, args.models))
        states = [net.state_dict() for net in nets]
        for case in ('match 2 inits', 'match planted', 'match 2 gaussian'):
            start = time.perf_counter()
            perm_spec = rebasin.permutation_spec(nets[0], torch.rand(1, 3, 32, 32))
            spec_s = time.perf_counter() - start
            a, b = states[0], states[1]
            if case == 'match planted':
                b = planted(perm_spec, a)
            elif case == 'match 2 gaussian':
                a, b = gaussian(a, 1), gaussian(b, 2)
            perm = rebasin.weight_matching(perm_spec, a, b, device=args.device)
            seconds = time.perf_counter() - start
            print(f'{arch:10} {case:22} {seconds:8.2f} {spec_s:7.2f} {len(perm.objective) - 1:14d}  '
                  f'objective {perm.objective[0]:.1f} -> {perm.objective[-1]:.1f}', flush=True)
        for case in (('merge inits', 'merge gaussian') if args.models >= 2 else ()):
            group = states[:args.models]
            group = group if case == 'merge inits' else [gaussian(st, i) for i, st in enumerate(group)]
            passes = []
            start = time.perf_counter()
            perm_spec = rebasin.permutation_spec(nets[0], torch.rand(1, 3, 32, 32))
            rebasin.merge_many(perm_spec, group, device=args.device,
                               progress=lambda r: passes.append(r['distance']) if 'distance' in r else None)
            seconds = time.perf_counter() - start
            print(f'{arch:10} {f"{case} of {args.models}":22} {seconds:8.2f} {"":7} {len(passes) - 1:14d}  '
                  f'Σ distance² {passes[0]:.1f} -> {passes[-1]:.1f}', flush=True)

if __name__ == '__main__':
    main()
