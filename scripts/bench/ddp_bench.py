"""PyTorch DDP with the Gloo backend on this machine's CPUs, as
scripts/bench-ddp.sh sets it beside tessera's data-parallel step:

    ddp_bench.py step PROCS BATCH STEPS WARMUP    median step of a ViT (JSON)
    ddp_bench.py allreduce PROCS ELEMENTS STEPS   median all-reduce (JSON)

The ViT is the one the script's tessera overrides describe: 32x32 images,
4x4 patches, width 192, 6 blocks of 3 heads, MLP 768, a class token, a
linear head to 10 classes; AdamW; random inputs (no data loading on either
side). Each process uses cores / PROCS threads, as tessera's launcher sets.
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image=32, patch=4, dim=192, depth=6, heads=3, mlp=768, classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def init(rank, procs, port):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=procs)


def step_worker(rank, procs, port, batch, steps, warmup, out):
    init(rank, procs, port)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(ViT())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(warmup + steps):
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if rank == 0:
        ms = statistics.median(times) * 1e3
        out.put({"framework": "pytorch-ddp-gloo", "torch": torch.__version__, "processes": procs,
                 "batch": batch, "step_ms": ms, "images_per_sec": batch * procs / ms * 1e3,
                 "params": sum(p.numel() for p in model.parameters())})
    dist.destroy_process_group()


def allreduce_worker(rank, procs, port, elements, steps, out):
    init(rank, procs, port)
    data = torch.arange(elements, dtype=torch.float32) % 1000 * 1e-3
    times = []
    for i in range(steps + 1):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(data)
        if i > 0:
            times.append(time.perf_counter() - t)
    if rank == 0:
        s = statistics.median(times)
        algbw = elements * 4 / s / 1e9
        out.put({"collective": "gloo all_reduce", "processes": procs, "elements": elements, "time_ms": s * 1e3,
                 "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (procs - 1) / procs})
    dist.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    mode, procs = sys.argv[1], int(sys.argv[2])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    if mode == "step":
        batch, steps, warmup = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        mp.spawn(step_worker, args=(procs, port, batch, steps, warmup, out), nprocs=procs)
    elif mode == "allreduce":
        elements, steps = int(sys.argv[3]), int(sys.argv[4])
        mp.spawn(allreduce_worker, args=(procs, port, elements, steps, out), nprocs=procs)
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(out.get()))


if __name__ == "__main__":
    main()
