"""Where one fine-tuning step of the demo zoo's experts spends its time (one thread, as each build worker).

The step (engine/zoo/build.py, `finetune`) makes three forward-backward passes of the tower on a batch
of 64 (the expert on its task's images, the partial expert θ0 + s·τ on the same images, the expert on
pool images for the anchor); recipe -4 adds one no-grad forward of θ0 on those pool images, which
recipe -5 computes once for all pool images instead. Timed in the same process, interleaved, median
of the repeats:

- each pass alone;
- recipe -4's whole step, and the same step with the expert's two batches fused into one pass of 128
  and the θ0 reference precomputed: if the tower were bound by per-operation overhead, fusing would save a
  third; if it is bound by compute, it saves only the reference forward;
- the step with the recipe's cheaper options: θ0's reference precomputed once
  (`finetune_anchor_precomputed`), and the partial term and the anchor on 32 images instead of 64
  (`finetune_partial_batch`, `finetune_anchor_batch`).

Random images (timing only). The tower is the recipe's shape, pretrained if a demo zoo is at --zoo.

    python benchmarks/zoo_finetune_step.py [--zoo .zoo/demo] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=".zoo/demo", help="demo zoo whose pretrained tower to time (else random)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a build worker uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engine.zoo import build

    pretrained = Path(args.zoo) / "pretrained.safetensors"
    if pretrained.is_file():
        from safetensors.torch import load_file

        state = load_file(pretrained)
        model, reference = build._tower(state, 0).train(), build._tower(state, 0).eval()
        print(f"tower: {pretrained}")
    else:
        model = build._new_model(0)
        reference = build._new_model(0).eval()
        reference.load_state_dict(model.state_dict())
        print("tower: randomly initialised (no demo zoo at --zoo)")
    batch, scale, anchor = 64, 20.0, 10.0
    gen = torch.Generator().manual_seed(0)
    x, xa = torch.randn(batch, 3, 32, 32, generator=gen), torch.randn(batch, 3, 32, 32, generator=gen)
    head = F.normalize(torch.randn(10, build.MODEL_KWARGS["output_dim"], generator=gen), dim=-1)
    y = torch.randint(0, 10, (batch,), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        za_table = F.normalize(reference(xa), dim=-1)

    def partial_features(images=x):
        partial = {n: start[n] + 0.5 * (p - start[n]) for n, p in model.named_parameters()}
        return F.normalize(torch.func.functional_call(model, partial, (images,)), dim=-1)

    def step_with(precomputed: bool, side: int):
        """The step as `finetune` runs it, with or without finetune_anchor_precomputed and side batches
        of `side` images (recipe -4's step: no precomputation, side = batch)."""
        z = F.normalize(model(x), dim=-1)
        zs = partial_features(x[:side])
        loss = F.cross_entropy(scale * z @ head.T, y) + F.cross_entropy(scale * zs @ head.T, y[:side])
        if precomputed:
            za = za_table[:side]
        else:
            with torch.no_grad():
                za = F.normalize(reference(xa[:side]), dim=-1)
        loss = loss + anchor * (F.normalize(model(xa[:side]), dim=-1) - za).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def step_fused():
        both = F.normalize(model(torch.cat([x, xa])), dim=-1)
        loss = F.cross_entropy(scale * both[:batch] @ head.T, y)
        loss = loss + F.cross_entropy(scale * partial_features() @ head.T, y)
        loss = loss + anchor * (both[batch:] - za_table).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def no_grad_reference():
        with torch.no_grad():
            reference(xa)

    timed = {
        "step, reference per batch (recipe -4)": lambda: step_with(False, batch),
        "step, reference precomputed (recipe -5)": lambda: step_with(True, batch),
        "step, reference precomputed, side batches 32": lambda: step_with(True, batch // 2),
        "step, fused + reference precomputed": step_fused,
        "expert pass (fwd+bwd, 64)": lambda: model(x).sum().backward(),
        "partial-expert pass (fwd+bwd, 64)": lambda: partial_features().sum().backward(),
        "one pass of 128 (fwd+bwd)": lambda: model(torch.cat([x, xa])).sum().backward(),
        "θ0 reference (fwd, 64)": no_grad_reference,
        "AdamW update": optimizer.step,
    }
    seconds = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            for _ in range(2):  # warm-up
                fn()
            clock = time.perf_counter()
            for _ in range(args.steps):
                fn()
            seconds[name].append((time.perf_counter() - clock) / args.steps)
    model.zero_grad(set_to_none=True)
    baseline = float(np.median(seconds["step, reference per batch (recipe -4)"]))
    print(f"{'':46s} {'ms':>7s}   share of recipe -4's step")
    for name, values in seconds.items():
        value = float(np.median(values))
        print(f"{name:46s} {1000 * value:7.1f}   {value / baseline:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
