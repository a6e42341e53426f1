"""The same U-Net's train step in JAX (this library) and in PyTorch, timed side by side.

PyTorch is a benchmark-only dependency (``pip install torch``; not in requirements.txt). The
PyTorch network below mirrors :class:`diffusion_jax.unet.UNet` layer for layer (GroupNorm, swish,
3x3 convolutions, the per-block embedding projection, 1x1 skips, attention, strided-conv
downsampling, repeat-and-conv upsampling, the optional patch folding) and its parameter count is
checked against the Flax one, so both frameworks do the same arithmetic. Each train step is the
library's: noise at a random timestep, the network's eps prediction, squared error, backward,
global-norm clipping and AdamW. Steps of the two frameworks alternate, so a noisy machine slows
both alike; medians after warm-up are reported with the ratio JAX / PyTorch.

    JAX_PLATFORMS=cpu python benchmarks/torch_peer.py --configs "cpu" \\
        --configs "cpu: patch_size=2 channels=32 channel_mults=1,2 num_res_blocks=2 \\
        attention_resolutions=7" --report docs/torch_peer.md
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    # Run as a file (python benchmarks/NAME.py), Python puts benchmarks/ on sys.path, not the
    # repository root; the root makes `benchmarks` (and diffusion_jax) importable either way.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cores, finish_report, header, md_table, script_parser  # noqa: E402
from benchmarks.workloads import RunSpec, step_runner, synthetic_dataset  # noqa: E402
from diffusion_jax import cli  # noqa: E402


def torch_unet(config, in_channels: int):
    """A PyTorch module computing what ``models.build_model(config)`` computes (NCHW)."""
    import torch
    from torch import nn

    groups, c0 = config.num_groups, config.channels
    emb_dim = 4 * c0

    class ResBlock(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.n1, self.n2 = nn.GroupNorm(groups, cin), nn.GroupNorm(groups, cout)
            self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
            self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
            self.proj = nn.Linear(emb_dim, cout)
            self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

        def forward(self, x, emb):
            h = self.c1(nn.functional.silu(self.n1(x)))
            h = h + self.proj(nn.functional.silu(emb))[:, :, None, None]
            h = self.c2(nn.functional.silu(self.n2(h)))
            return self.skip(x) + h

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm = nn.GroupNorm(groups, c)
            self.attn = nn.MultiheadAttention(c, config.num_heads, batch_first=True)

        def forward(self, x):
            b, c, h, w = x.shape
            y = self.norm(x).flatten(2).transpose(1, 2)
            y = self.attn(y, y, y, need_weights=False)[0]
            return x + y.transpose(1, 2).reshape(b, c, h, w)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            p = config.patch_size
            self.p = p
            self.time = nn.Sequential(
                nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            self.cls = nn.Embedding(config.num_classes + 1, emb_dim)
            self.stem = nn.Conv2d(in_channels * p * p, c0, 3, padding=1)
            size = 28 // p
            self.down, widths, ch = nn.ModuleList(), [c0], c0
            levels = len(config.channel_mults)
            for level, mult in enumerate(config.channel_mults):
                for _ in range(config.num_res_blocks):
                    block = [ResBlock(ch, c0 * mult)]
                    ch = c0 * mult
                    if size in config.attention_resolutions:
                        block.append(Attention(ch))
                    self.down.append(nn.ModuleList(block))
                    widths.append(ch)
                if level < levels - 1:
                    self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                    widths.append(ch)
                    size //= 2
            self.mid = nn.ModuleList([ResBlock(ch, ch), Attention(ch), ResBlock(ch, ch)])
            self.up = nn.ModuleList()
            for level, mult in reversed(list(enumerate(config.channel_mults))):
                for _ in range(config.num_res_blocks + 1):
                    block = [ResBlock(ch + widths.pop(), c0 * mult)]
                    ch = c0 * mult
                    if size in config.attention_resolutions:
                        block.append(Attention(ch))
                    self.up.append(nn.ModuleList(block))
                if level > 0:
                    self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
                    size *= 2
            self.out_norm = nn.GroupNorm(groups, ch)
            self.head = nn.Conv2d(ch, in_channels * p * p, 3, padding=1)

        def embed(self, t, y):
            half = emb_dim // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
            ang = t.float()[:, None] * freqs[None]
            return self.time(torch.cat([ang.sin(), ang.cos()], 1)) + self.cls(y)

        def forward(self, x, t, y):
            emb = self.embed(t, y)
            if self.p > 1:
                x = nn.functional.pixel_unshuffle(x, self.p)
            h = self.stem(x)
            skips = [h]
            for layer in self.down:
                if isinstance(layer, nn.ModuleList):
                    h = layer[0](h, emb)
                    for extra in layer[1:]:
                        h = extra(h)
                else:
                    h = layer(h)
                skips.append(h)
            h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
            for layer in self.up:
                if isinstance(layer, nn.ModuleList):
                    h = layer[0](torch.cat([h, skips.pop()], 1), emb)
                    for extra in layer[1:]:
                        h = extra(h)
                else:
                    h = layer(nn.functional.interpolate(h, scale_factor=2, mode="nearest"))
            h = self.head(nn.functional.silu(self.out_norm(h)))
            if self.p > 1:
                h = nn.functional.pixel_shuffle(h, self.p)
            return h

    return UNet()


def torch_step_fn(config, batch: int, seed: int):
    """A zero-argument callable running one PyTorch train step; and the parameter count."""
    import torch

    from diffusion_jax.schedules import make_schedule

    torch.manual_seed(seed)
    model = torch_unet(config, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    abar = torch.tensor(np.asarray(make_schedule(config.schedule, config.num_timesteps).alpha_bar))
    x0 = torch.rand(batch, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, config.num_classes, (batch,))

    def step():
        t = torch.randint(0, config.num_timesteps, (batch,))
        eps = torch.randn_like(x0)
        a = abar[t].float()[:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(model(x_t, t, labels), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


def jax_step_fn(config, batch: int, seed: int):
    """A zero-argument callable running one of the library's train steps; the parameter count."""
    return step_runner(config, synthetic_dataset(config.num_classes, max(batch, 512), seed=seed))


def compare(spec: RunSpec, batch: int, repeats: int, seed: int) -> dict:
    from diffusion_jax import config as config_lib

    config = config_lib.get_config(spec.preset, **spec.overrides, batch_size=batch)
    if config.dropout:
        config = config_lib.get_config(spec.preset, **spec.overrides, batch_size=batch, dropout=0)
    jax_step, jax_params = jax_step_fn(config, batch, seed)
    torch_step, torch_params = torch_step_fn(config, batch, seed)
    if jax_params != torch_params:
        raise RuntimeError(
            f"{spec.name}: the PyTorch mirror has {torch_params} parameters, the Flax U-Net "
            f"{jax_params}; the architectures differ"
        )
    start = time.perf_counter()
    jax_step()
    jax_compile = time.perf_counter() - start
    for _ in range(2):  # warm-up
        jax_step(), torch_step()
    times = {"jax": [], "torch": []}
    for _ in range(repeats):
        for name, fn in (("jax", jax_step), ("torch", torch_step)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    jax_s, torch_s = (float(np.median(times[k])) for k in ("jax", "torch"))
    return dict(
        name=spec.name,
        params=jax_params,
        batch=batch,
        jax_ms=jax_s * 1e3,
        torch_ms=torch_s * 1e3,
        ratio=jax_s / torch_s,
        jax_img_s=batch / jax_s,
        torch_img_s=batch / torch_s,
        jax_compile_s=jax_compile,
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = script_parser(__doc__)
    parser.add_argument(
        "--configs",
        action="append",
        default=None,
        help="'NAME: key=value ...' as in quality_vs_time.py (preset=P; default preset cpu)",
    )
    parser.add_argument(
        "--batch_sizes",
        type=cli.list_type(int, name="the value", minimum=1, example="32,64"),
        default="64",
        help="comma-separated",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", help="markdown file to write (never overwritten)")
    args = parser.parse_args(argv)
    import torch

    # as many threads as XLA:CPU uses: the cores this process may run on (taskset respected)
    torch.set_num_threads(cores())
    specs = [RunSpec.parse(t, "cpu") for t in (args.configs or ["cpu"])]
    rows = [compare(s, b, args.repeats, args.seed) for s in specs for b in args.batch_sizes]
    lines = header(
        "JAX against PyTorch: the same U-Net's train step", argv, ("jax", "flax", "torch")
    ) + [
        f"- torch threads {torch.get_num_threads()}",
        f"- medians of {args.repeats} alternating steps after 2 warm-up steps each",
        "",
        md_table(
            [
                "config",
                "params",
                "batch",
                "JAX ms/step",
                "PyTorch ms/step",
                "JAX / PyTorch",
                "JAX img/s",
                "PyTorch img/s",
                "JAX compile s",
            ],
            [
                [
                    r["name"],
                    f"{r['params']:,}",
                    r["batch"],
                    f"{r['jax_ms']:.0f}",
                    f"{r['torch_ms']:.0f}",
                    f"{r['ratio']:.2f}",
                    f"{r['jax_img_s']:.0f}",
                    f"{r['torch_img_s']:.0f}",
                    f"{r['jax_compile_s']:.1f}",
                ]
                for r in rows
            ],
        ),
    ]
    finish_report(lines, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
