#!/usr/bin/env python3
"""PyTorch eager's ViT training step on the GPU, the baseline tessera's
`tessera bench` is set beside: timm's model, torch's bf16 autocast, fused
AdamW, gradient clipping, synthetic data already on the GPU (as measured in
shared/reference/gpu.md). Prints one JSON line.

Usage: torch_bench.py MODEL BATCH STEPS   (e.g. vit_base_patch16_224 256 20)
"""
import json
import sys
import time


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import torch
    import timm

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = timm.create_model(name, pretrained=False, num_classes=1000).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        loss.item()  # the engine reads its loss every step too
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    step_s = times[len(times) // 2]
    print(json.dumps({
        "model": name,
        "device": torch.cuda.get_device_name(0),
        "batch": batch,
        "step_ms": step_s * 1e3,
        "images_per_sec": batch / step_s,
        "max_allocated_bytes": torch.cuda.max_memory_allocated(),
        "max_reserved_bytes": torch.cuda.max_memory_reserved(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }))


if __name__ == "__main__":
    main()
