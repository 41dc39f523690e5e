"""Small timm ViTs on scikit-learn's digits: LiSA vs plain linear attention vs softmax attention (CPU, minutes).

    python examples/digits_vit.py                 # 5 seeds x 3 variants, 600 steps each: about 5 min on one core
    python examples/digits_vit.py --quick         # 1 seed, 100 steps: a smoke test of under a minute
    python examples/digits_vit.py --help

The data ships with scikit-learn (``sklearn.datasets.load_digits``: 1797 grey 8x8 images of the digits 0-9,
nothing is downloaded). A fixed stratified split (random_state=0) gives 1347 training and 450 test images.

The model is timm's own ``VisionTransformer`` (img_size 8, 2x2 patches: a 4x4 token grid + CLS, dim 64,
4 heads, depth 3, MLP ratio 2, learned position embedding), the way a timm user would build it. The three
variants start from the same weights for every shared parameter (one model per seed, deep-copied):

* ``softmax``: the timm model as built (softmax attention, ``F.scaled_dot_product_attention``);
* ``linear``:  ``lisa_kernels.nn.convert_vit(model)`` with the RPE tables frozen at zero: plain normalised
  linear attention, phi = elu + 1 (LiSA at zero RPE is exactly that);
* ``lisa``:    ``lisa_kernels.nn.convert_vit(model)`` with trainable RPE tables.

Equal steps, batch, optimiser and schedule for all. Parameters: ``linear`` and ``softmax`` train the same
parameters; ``lisa`` adds its RPE tables (depth x heads x (7*7 + 3) = 624 here, 0.6 %).

Writes ``examples/results/digits_vit.json`` (config, machine, per-run accuracy, loss curve, times) and
``digits_vit.md`` (the table). A tqdm progress bar shows the training when tqdm is installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lisa_kernels  # noqa: E402
from lisa_kernels.nn import LiSAAttention, convert_vit  # noqa: E402

try:
    import timm
except ImportError:  # pragma: no cover
    sys.exit("this example needs timm: pip install timm (or pip install .[test])")
try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError:  # pragma: no cover
    sys.exit("this example needs scikit-learn: pip install scikit-learn (or pip install .[test])")
try:
    from tqdm.auto import tqdm
except ImportError:  # keep the example runnable without tqdm: a plain progress line instead
    tqdm = None

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("lisa", "linear", "softmax")


def load_data(device):
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]          # (1797, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return t((x_tr - mean) / std), t(y_tr), t((x_te - mean) / std), t(y_te)


def build_base(args, seed: int):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=args.patch,
                             in_chans=1, num_classes=10, embed_dim=args.dim, depth=args.depth,
                             num_heads=args.heads, mlp_ratio=2.0, qkv_bias=True, drop_path_rate=0.0)


def make_variant(base, variant: str, args):
    model = copy.deepcopy(base)
    if variant == "softmax":
        return model
    convert_vit(model, num_rpe=args.num_rpe, backend=args.backend)
    if variant == "linear":
        for m in model.modules():
            if isinstance(m, LiSAAttention):
                for p in m.rpe.parameters():
                    p.requires_grad_(False)
    return model


def param_groups(model, args):
    decay, no_decay, rpe = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".rpe." in name:
            rpe.append(p)
        elif p.ndim <= 1 or name in ("cls_token", "pos_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if rpe:
        groups.append({"params": rpe, "weight_decay": 0.0, "lr_mult": args.rpe_lr_mult})
    return groups


def augment(x, gen):
    """A random shift of up to 1 pixel per axis (zero fill), the same for every variant."""
    B = x.shape[0]
    pad = F.pad(x[:, 0], (1, 1, 1, 1))                                # (B, 10, 10)
    dy, dx = torch.randint(0, 3, (2, B), generator=gen)
    rows = torch.arange(8)[None, :] + dy[:, None]                    # (B, 8)
    cols = torch.arange(8)[None, :] + dx[:, None]
    return pad[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = model(x)
    model.train()
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def train_one(model, data, args, seed: int, label: str):
    x_tr, y_tr, x_te, y_te = data
    gen = torch.Generator().manual_seed(1000 + seed)       # batch order and shifts: same for every variant
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.999))
    for g in opt.param_groups:
        g["base_lr"] = args.lr * g.get("lr_mult", 1.0)
    warm = max(1, args.steps // 20)
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(args.steps), desc=label, leave=False, dynamic_ncols=True, mininterval=1.0) if tqdm else range(args.steps)
    model.train()
    n = x_tr.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in bar:
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm)))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        loss = F.cross_entropy(model(augment(x_tr[idx], gen)), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if tqdm:
            if step % 10 == 0 or step == args.steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        elif step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  {label}: step {step + 1}/{args.steps} loss {np.mean(losses[-10:]):.3f}", flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc, test_loss = evaluate(model, x_te, y_te)
    rpe_max = max((m.rpe.rpe.detach().abs().max().item() for m in model.modules() if isinstance(m, LiSAAttention)),
                  default=None)
    return {"test_acc": acc, "test_loss": test_loss, "train_loss": losses, "wall_s": wall, "cpu_s": cpu,
            "max_abs_rpe": rpe_max}


def count(model):
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def machine():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    return {"cpu": platform.processor() or platform.machine(), "os_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "lisa_kernels": lisa_kernels.__version__, "commit": commit,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def table(results, variants, seeds):
    lines = ["| variant | test accuracy (%), mean ± std | min..max (%) | per seed (%) | params (total / trainable) | s / run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        accs = np.array([results[v][str(s)]["test_acc"] * 100 for s in seeds])
        std = accs.std(ddof=1) if len(accs) > 1 else 0.0
        secs = np.mean([results[v][str(s)]["wall_s"] for s in seeds])
        tot, tr = results[v]["params"]
        lines.append(f"| {v} | {accs.mean():.1f} ± {std:.1f} | {accs.min():.1f}..{accs.max():.1f} | "
                     f"{' / '.join(f'{a:.1f}' for a in accs)} | {tot:,} / {tr:,} | {secs:.1f} |")
    return "\n".join(lines)


def _shown(path: str) -> str:
    """``path`` relative to the repository root when it is inside it."""
    root = os.path.dirname(HERE)
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--rpe-lr-mult", type=float, default=10.0,
                    help="learning-rate multiplier of the RPE tables (lisa only; default 10)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=2, choices=(1, 2, 4), help="patch size: 8/patch x 8/patch grid")
    ap.add_argument("--num-rpe", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared CPU)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 100 steps")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "digits_vit"), help="output path without extension")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = [0], 100
        if args.out == ap.get_default("out"):
            args.out += "_quick"
    torch.set_num_threads(args.threads)
    data = load_data("cpu")
    t_start = time.perf_counter()
    results = {v: {} for v in args.variants}
    runs = [(s, v) for s in args.seeds for v in args.variants]
    print(f"digits: {len(data[1])} train / {len(data[3])} test images; {len(runs)} runs of {args.steps} steps",
          flush=True)
    for i, (seed, v) in enumerate(runs):
        base = build_base(args, seed)
        model = make_variant(base, v, args)
        results[v]["params"] = count(model)
        r = train_one(model, data, args, seed, f"[{i + 1}/{len(runs)}] seed {seed} {v}")
        results[v][str(seed)] = r
        print(f"[{i + 1}/{len(runs)}] seed {seed} {v:8s} test acc {100 * r['test_acc']:.1f}%  "
              f"loss {r['test_loss']:.3f}  {r['wall_s']:.1f} s", flush=True)
    total = time.perf_counter() - t_start
    md = table(results, args.variants, args.seeds)
    info = machine()
    header = (f"digits ({len(data[1])} train / {len(data[3])} test), {args.steps} steps, batch {args.batch}, "
              f"seeds {args.seeds}; {info['date_utc']} UTC, torch {info['torch']}, timm {info['timm']}, "
              f"{info['torch_threads']} thread(s); total {total:.0f} s")
    print("\n" + header + "\n\n" + md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    config = dict(vars(args), out=_shown(args.out))            # no machine path in the saved files
    with open(args.out + ".json", "w") as f:
        json.dump({"config": config, "machine": info, "total_wall_s": total, "results": results}, f)
    with open(args.out + ".md", "w") as f:
        f.write(header + "\n\n" + md + "\n")
    print(f"\nwrote {_shown(args.out)}.json and {_shown(args.out)}.md")
    return results


if __name__ == "__main__":
    main()
