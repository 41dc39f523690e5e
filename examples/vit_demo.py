"""A tiny LiSA-ViT trained on the CPU: LiSA vs plain linear attention vs softmax attention.

    python examples/vit_demo.py            # the full demo: 3 seeds x 3 variants x 2 settings, ~8 min on 1 core
    python examples/vit_demo.py --quick    # ~1.5 min smoke test: 250 steps, 1 seed, smaller data

The task ("where is B relative to A"): a 16x16 single-channel image cut into 2x2 patches (an 8x8 token grid)
holds one mark A (a 2x2 diagonal), one mark B (the anti-diagonal), a few distractor marks (a filled 2x2
square) and pixel noise, each mark on its own patch at a random place. The label is the quadrant of B
relative to A: (B right of A?, B below A?) -> 4 classes, chance = 25%. The absolute positions carry no
information on their own; only the *relative* position of the two marks does.

Three attention variants in the same ViT (same qkv/proj parameters, same budget):

* ``lisa``:    ``lisa_kernels.nn.LiSAAttention`` with trainable RPE tables (M = num_rpe groups per head),
* ``linear``:  the same module with its RPE tables left at zero and frozen: plain normalised linear attention,
* ``softmax``: standard softmax attention (``F.scaled_dot_product_attention``) with the same qkv/proj.

Two position settings, the same for all three variants: ``learned`` (a learned absolute position embedding
added to the patch tokens, as in ViT) and ``none`` (no absolute position embedding: then softmax and linear
attention are permutation-invariant over the patches and cannot see where anything is; only LiSA's
relative-position weights can).

Writes ``examples/results/``: ``vit_demo.json`` (everything, incl. per-seed curves), ``vit_demo.png``
(training loss and test accuracy vs step, mean over seeds with a min-max band), ``vit_demo.md`` (table).
``--replot results/X.json`` redraws a PNG from its JSON. See examples/README.md for the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lisa_kernels  # noqa: E402
from lisa_kernels.nn import LiSAAttention  # noqa: E402

VARIANTS = ("lisa", "linear", "softmax")
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------
# data


def _marks(patch: int) -> Dict[str, np.ndarray]:
    eye = np.eye(patch, dtype=np.float32)
    return {"A": eye, "B": eye[::-1].copy(), "C": np.ones((patch, patch), np.float32)}


def make_relpos_dataset(n: int, grid: int = 8, patch: int = 2, distractors: int = 3, noise: float = 0.15,
                        seed: int = 0):
    """Images (n, 1, grid*patch, grid*patch) and labels (n,) = 2 * [B right of A] + [B below A].

    A and B never share a row or a column of the patch grid, so the quadrant is always defined. The classes
    are balanced by drawing the label first and then a placement that realises it.
    """
    rng = np.random.default_rng(seed)
    marks = _marks(patch)
    side = grid * patch
    x = rng.normal(0.0, noise, size=(n, 1, side, side)).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    for i in range(n):
        right, below = divmod(int(y[i]), 2)
        # A at (ra, ca), B at (rb, cb) with sign(cb - ca) = right, sign(rb - ra) = below, both nonzero
        r0, r1 = sorted(rng.choice(grid, size=2, replace=False))
        c0, c1 = sorted(rng.choice(grid, size=2, replace=False))
        ra, rb = (r0, r1) if below else (r1, r0)
        ca, cb = (c0, c1) if right else (c1, c0)
        used = {(ra, ca), (rb, cb)}
        cells = [(ra, ca, "A"), (rb, cb, "B")]
        k = int(rng.integers(0, distractors + 1))
        while k:
            rc = (int(rng.integers(grid)), int(rng.integers(grid)))
            if rc not in used:
                used.add(rc)
                cells.append((rc[0], rc[1], "C"))
                k -= 1
        for r, c, m in cells:
            x[i, 0, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += marks[m]
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------
# model


class SoftmaxAttention(nn.Module):
    """timm-style attention with F.scaled_dot_product_attention: the same qkv / proj as LiSAAttention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, attn: nn.Module):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (conv), CLS token, optional learned absolute position embedding, pre-norm blocks."""

    def __init__(self, variant: str, pos: str, *, img: int = 16, patch: int = 2, dim: int = 32, depth: int = 2,
                 heads: int = 2, mlp_ratio: int = 2, num_rpe: int = 1, num_classes: int = 4,
                 backend: str = "auto"):
        super().__init__()
        self.grid = (img // patch, img // patch)
        n = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02) if pos == "learned" else None
        blocks = []
        for _ in range(depth):
            if variant == "softmax":
                attn = SoftmaxAttention(dim, heads, qkv_bias=True)
            else:
                attn = LiSAAttention(dim, heads, qkv_bias=True, grid=self.grid, num_extra=1, num_rpe=num_rpe,
                                     feature_map="elu1", boundary="zero", backend=backend)
                if variant == "linear":        # zero tables, frozen: plain normalised linear attention
                    for prm in attn.rpe.parameters():
                        prm.requires_grad_(False)
            blocks.append(Block(dim, heads, mlp_ratio, attn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)          # (B, N, C), row-major patch grid
        if self.pos is not None:
            x = x + self.pos
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def param_counts(model: nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rpe = sum(p.numel() for n, p in model.named_parameters() if ".rpe." in n)
    return {"total": total, "trainable": trainable, "rpe_tables": rpe}


# ----------------------------------------------------------------------------------------------------------
# training


def make_optimizer(model, lr, wd, rpe_lr_mult):
    """AdamW; no weight decay on biases, norms, CLS, position embeddings and RPE tables (timm's habit for
    pos_embed). The RPE tables (log-weights, one entry per offset) get ``rpe_lr_mult`` times the learning rate:
    Adam moves each entry by about lr per step, and a table must move by several units from 0 to express
    a structure (exp(3) = 20x more weight on one offset than another)."""
    decay, no_decay, rpe = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".rpe." in name:
            rpe.append(p)
        else:
            (no_decay if p.ndim <= 1 or name in ("cls", "pos") else decay).append(p)
    groups = [{"params": decay, "weight_decay": wd, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if rpe:
        groups.append({"params": rpe, "weight_decay": 0.0, "lr_mult": rpe_lr_mult})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def lr_at(step, steps, warmup, lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model, x, y, batch=500):
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        loss += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def train_one(variant, pos, seed, data, cfg):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = TinyViT(variant, pos, img=cfg.grid * 2, patch=2, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                    num_rpe=cfg.num_rpe, backend=cfg.backend)
    counts = param_counts(model)
    opt = make_optimizer(model, cfg.lr, cfg.wd, cfg.rpe_lr_mult)
    gen = torch.Generator().manual_seed(1000 + seed)
    perm, ptr = torch.randperm(len(xtr), generator=gen), 0
    train_loss, eval_steps, test_acc, test_loss = [], [], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        if ptr + cfg.batch > len(xtr):
            perm, ptr = torch.randperm(len(xtr), generator=gen), 0
        idx = perm[ptr:ptr + cfg.batch]
        ptr += cfg.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.warmup, cfg.lr) * g["lr_mult"]
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            tl, ta = evaluate(model, xte, yte)
            eval_steps.append(step + 1)
            test_loss.append(tl)
            test_acc.append(ta)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"seed": seed, "final_test_acc": test_acc[-1], "final_test_loss": test_loss[-1], "wall_s": wall,
           "cpu_s": cpu,
           "train_loss": train_loss, "eval_steps": eval_steps, "test_acc": test_acc, "test_loss": test_loss,
           "params": counts}
    if variant == "lisa":   # how far the tables moved from zero (plain linear attention)
        out["rpe_abs_max"] = max(float(b.attn.rpe.rpe.detach().abs().max()) for b in model.blocks)
    return out


# ----------------------------------------------------------------------------------------------------------
# reporting


def machine_info():
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = None
    try:
        import subprocess
        root = os.path.dirname(HERE)
        commit = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "repo_commit": commit,
            "torch": torch.__version__, "lisa_kernels": lisa_kernels.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def smooth(a, k):
    a = np.asarray(a, dtype=np.float64)
    if k <= 1:
        return a
    c = np.cumsum(np.insert(a, 0, 0.0))
    out = np.empty_like(a)
    for i in range(len(a)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot(results, path, smooth_k, grid):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    style = {"lisa": ("tab:red", "-"), "linear": ("tab:blue", "--"), "softmax": ("tab:green", "-")}
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.9 * len(settings)), squeeze=False)
    for row, pos in enumerate(settings):
        for v in VARIANTS:
            if v not in results[pos]:
                continue
            color, ls = style[v]
            runs = results[pos][v]["runs"]
            n = len(runs)
            tl = np.stack([smooth(r["train_loss"], smooth_k) for r in runs])
            steps = np.arange(1, tl.shape[1] + 1)
            acc = np.stack([r["test_acc"] for r in runs]) * 100
            es = runs[0]["eval_steps"]
            m, s = results[pos][v]["acc_mean"] * 100, results[pos][v]["acc_std"] * 100
            lab = f"{v}  ({m:.1f} ± {s:.1f}%)" if n > 1 else f"{v}  ({m:.1f}%)"
            ax = axes[row, 0]
            z = 3 if v == "linear" else 2   # dashed on top: where linear and softmax coincide, both show
            ax.plot(steps, tl.mean(0), color=color, ls=ls, label=lab, zorder=z)
            ax.fill_between(steps, tl.min(0), tl.max(0), color=color, alpha=0.2)
            ax = axes[row, 1]
            ax.plot(es, acc.mean(0), color=color, ls=ls, marker="o", ms=3, label=lab, zorder=z)
            ax.fill_between(es, acc.min(0), acc.max(0), color=color, alpha=0.2)
        pos_txt = "learned abs. position embedding" if pos == "learned" else "no abs. position embedding"
        axes[row, 0].set_title(f"{pos_txt}: training loss", fontsize=10)
        axes[row, 1].set_title(f"{pos_txt}: test accuracy", fontsize=10)
        axes[row, 0].set_ylabel(f"cross-entropy (moving avg {smooth_k})")
        axes[row, 1].set_ylabel("test accuracy (%)")
        axes[row, 1].axhline(25, color="gray", ls=":", lw=1)
        axes[row, 1].set_ylim(0, 101)
        for ax in axes[row]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=9)
    fig.suptitle(f"Tiny ViT, 'where is B relative to A' ({grid}x{grid} patch grid, 4 classes, chance 25% dotted)\n"
                 f"line = mean over {n} seeds, band = min..max over seeds; legend: final test accuracy mean ± std",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(summary, cfg, wall, machine):
    lines = [f"Test accuracy after {cfg['steps']} steps (batch {cfg['batch']}), mean ± std (sample std, "
             f"ddof=1) over {len(cfg['seeds'])} seeds {cfg['seeds']}; min..max in brackets.",
             "",
             "| position embedding | variant | test accuracy (%) | min..max (%) | test loss "
             "| params (total / trainable) | s / run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for pos, per in summary.items():
        for v, r in per.items():
            accs = [x["final_test_acc"] * 100 for x in r["runs"]]
            pm = f" ± {r['acc_std'] * 100:.1f}" if len(accs) > 1 else " (1 seed)"
            lines.append(f"| {pos} | {v} | {r['acc_mean'] * 100:.1f}{pm} | "
                         f"{min(accs):.1f}..{max(accs):.1f} | {r['loss_mean']:.3f} | "
                         f"{r['params']['total']:,} / {r['params']['trainable']:,} | {r['wall_mean_s']:.1f} |")
    lines += ["", f"Whole demo: {wall:.0f} s on {machine['cpu']} ({machine['logical_cores']} logical cores, "
              f"torch {machine['torch']}, {machine['torch_threads']} threads)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer steps and seeds, smaller data")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rpe-lr-mult", type=float, default=10.0,
                    help="learning-rate multiplier of the LiSA RPE tables (see make_optimizer)")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--grid", type=int, default=8, help="side of the patch grid (image = 2 * grid pixels)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--num-rpe", type=int, default=1, help="M, RPE tables per head in LiSA")
    ap.add_argument("--backend", default="auto", help="lisa_kernels backend of the LiSA layers (default auto)")
    ap.add_argument("--pos", choices=("learned", "none", "both"), default="both")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these ops are tiny, and on a busy machine 2 threads "
                         "that wait for each other were 10-40x slower than 1)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only redraw the PNG next to a results JSON written by this script")
    ap.add_argument("--name", default=None, help="file stem of the outputs (default vit_demo, or vit_demo_quick)")
    cfg = ap.parse_args(argv)
    if cfg.replot:
        with open(cfg.replot) as f:
            doc = json.load(f)
        c = doc["config"]
        path = os.path.splitext(cfg.replot)[0] + ".png"
        plot(doc["runs"], path, smooth_k=max(1, c["steps"] // 30), grid=c["grid"][0])
        print(f"wrote {os.path.relpath(path)}")
        return
    if cfg.steps is None:
        cfg.steps = 250 if cfg.quick else 600
    if cfg.seeds is None:
        cfg.seeds = [0] if cfg.quick else [0, 1, 2]
    if cfg.n_train is None:
        cfg.n_train = 4000 if cfg.quick else 10000
    if cfg.quick:
        cfg.n_test = min(cfg.n_test, 1000)
    cfg.warmup = max(1, cfg.steps // 20)
    cfg.eval_every = max(1, cfg.steps // 15)
    if cfg.name is None:
        cfg.name = "vit_demo_quick" if cfg.quick else "vit_demo"
    torch.set_num_threads(cfg.threads)
    settings = ["learned", "none"] if cfg.pos == "both" else [cfg.pos]
    os.makedirs(cfg.out, exist_ok=True)

    t_all = time.perf_counter()
    xtr, ytr = make_relpos_dataset(cfg.n_train, grid=cfg.grid, seed=12345)
    xte, yte = make_relpos_dataset(cfg.n_test, grid=cfg.grid, seed=54321)
    data = (xtr, ytr, xte, yte)
    machine = machine_info()
    print(f"data: train {tuple(xtr.shape)}, test {tuple(xte.shape)}, class counts {torch.bincount(ytr).tolist()}")
    print(f"machine: {machine['cpu']}, {machine['logical_cores']} cores, torch {machine['torch']}, "
          f"{machine['torch_threads']} threads")

    results: Dict[str, Dict[str, dict]] = {}
    for pos in settings:
        results[pos] = {}
        for v in cfg.variants:
            runs: List[dict] = []
            for seed in cfg.seeds:
                r = train_one(v, pos, seed, data, cfg)
                runs.append(r)
                print(f"[pos={pos:7s}] {v:7s} seed {seed}: test acc {r['final_test_acc'] * 100:5.1f}%  "
                      f"loss {r['final_test_loss']:.3f}  ({r['wall_s']:.1f} s)"
                      + (f"  max|rpe| {r['rpe_abs_max']:.2f}" if 'rpe_abs_max' in r else ""), flush=True)
            accs = np.array([r["final_test_acc"] for r in runs])
            results[pos][v] = {"runs": runs, "params": runs[0]["params"],
                               "acc_mean": float(accs.mean()),
                               "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                               "loss_mean": float(np.mean([r["final_test_loss"] for r in runs])),
                               "wall_mean_s": float(np.mean([r["wall_s"] for r in runs])),
                               "cpu_mean_s": float(np.mean([r["cpu_s"] for r in runs]))}
    wall = time.perf_counter() - t_all

    # which backend "auto" chose for the LiSA layers here (forward + backward, this batch size)
    q = torch.zeros(cfg.batch, cfg.heads, 1 + cfg.grid ** 2, cfg.dim // cfg.heads, requires_grad=True)
    rpe = torch.zeros(cfg.heads, cfg.num_rpe, 2 * cfg.grid - 1, 2 * cfg.grid - 1, requires_grad=True)
    chosen = lisa_kernels.explain(q, q, q, rpe, grid=(cfg.grid, cfg.grid), num_extra=1).chosen

    cfg_d = {k: v for k, v in vars(cfg).items() if k not in ("out",)}
    cfg_d.update(task="relpos-quadrant", image=2 * cfg.grid, patch=2, grid=[cfg.grid, cfg.grid], num_classes=4,
                 distractors="0..3",
                 noise_std=0.15, data_seeds={"train": 12345, "test": 54321}, optimizer="AdamW",
                 schedule="linear warmup + cosine to 0", grad_clip=1.0, mlp_ratio=2, feature_map="elu1",
                 boundary="zero", lisa_backend_auto_choice=chosen)
    doc = {"config": cfg_d, "machine": machine, "wall_s": wall,
           "summary": {pos: {v: {k: x for k, x in r.items() if k != "runs"} | {
               "per_seed_acc": [x["final_test_acc"] for x in r["runs"]]} for v, r in per.items()}
               for pos, per in results.items()},
           "runs": results}
    jpath = os.path.join(cfg.out, cfg.name + ".json")
    with open(jpath, "w") as f:
        json.dump(doc, f, indent=1)
    ppath = os.path.join(cfg.out, cfg.name + ".png")
    plot(results, ppath, smooth_k=max(1, cfg.steps // 30), grid=cfg.grid)
    mpath = os.path.join(cfg.out, cfg.name + ".md")
    with open(mpath, "w") as f:
        f.write(markdown_table(results, cfg_d, wall, machine))
    print(markdown_table(results, cfg_d, wall, machine))
    print(f"wrote {os.path.relpath(jpath)}, {os.path.relpath(ppath)}, {os.path.relpath(mpath)}  (auto backend for LiSA here: {chosen!r}; total {wall:.0f} s)")


if __name__ == "__main__":
    main()
