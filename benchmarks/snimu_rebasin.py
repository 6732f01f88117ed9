"""The large pairs of the scale benchmark, and the same job done by the peer, snimu/rebasin (PyPI `rebasin`).

    python benchmarks/bench_rebasin.py --arch resnet50 --peer /tmp/peer-lib   # runs this file as its worker

bench_rebasin.py builds its pairs with large_pair() and, given --peer, runs this file in a child process
whose PYTHONPATH is the peer's install directory (`pip install --target DIR rebasin==0.0.47 torchview
graphviz tqdm --no-deps`; it never enters the project's environment) and whose working directory is not
the project's, so `import rebasin` finds the peer, not rebasin.py. The child prints one JSON line: the
seconds of the peer's tracing (PermutationCoordinateDescent's constructor), of its matching and
permuting (.rebasin()), and the child's peak resident memory (Linux: VmHWM).
"""
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def large_pair(arch):
    """(model_a, model_b, example input): two networks with random weights of a large size (the matching's
    time depends on the sizes, not on training). resnet50: torchvision's (25.6M parameters); vit-b16: the
    project's ViT at ViT-B/16's size (width 768, depth 12, 12 heads, 16x16 patches of 224x224 images,
    MLPs 3072 wide, 1000 classes; 86M parameters)."""
    if arch == 'resnet50':
        import torchvision
        nets = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            nets.append(torchvision.models.resnet50(weights=None))
        return nets[0], nets[1], torch.zeros(1, 3, 224, 224)
    if arch == 'vit-b16':
        sys.path.append(str(ROOT))   # last, after the peer's directory: only train_ensemble is wanted from here
        import train_ensemble as te
        spec = dict(arch='vit', in_channels=3, image_size=224, num_classes=1000, width=768 / te.VIT_DIM, depth=12,
                    heads=12, patch_size=16, kernel_size=3, mean=[0.5] * 3, std=[0.25] * 3)
        return te.init_member(spec, 0), te.init_member(spec, 1), torch.zeros(1, 3, 224, 224)
    raise ValueError(f"unknown large pair '{arch}': resnet50 or vit-b16")


def main(arch):
    import rebasin as peer
    if not hasattr(peer, 'PermutationCoordinateDescent'):
        sys.exit(f'{peer.__file__} is not snimu/rebasin: run with PYTHONPATH=<its install directory>, '
                 'from a directory without rebasin.py')
    torch.set_num_threads(1)
    model_a, model_b, x = large_pair(arch)
    start = time.perf_counter()
    job = peer.PermutationCoordinateDescent(model_a, model_b, x)
    traced = time.perf_counter()
    job.rebasin()
    done = time.perf_counter()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
    hwm = next(line for line in Path('/proc/self/status').read_text().splitlines() if line.startswith('VmHWM'))
    print(json.dumps({'trace_s': traced - start, 'seconds': done - start, 'peak_gib': int(hwm.split()[1]) / 2 ** 20}))


if __name__ == '__main__':
    main(sys.argv[1])
