"""`python -m engine ri`: Resolving Interference, adapting a zoo's experts into a new zoo (methods.md §5)."""
from __future__ import annotations

import argparse
import dataclasses

from ..errors import ConfigError
from ..methods.base import validate_config
from ..methods.ri import RIConfig
from .common import print_json
from .method_args import add_field_argument


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ri", help="Resolving Interference: adapt every expert on unlabeled auxiliary images, write a new zoo",
        description="Adapt each expert so that under its own head it still matches itself while under every other "
                    "task's head it matches the pretrained model, using only unlabeled auxiliary images "
                    "(methods.md §5). Writes a zoo in the same format to --out, so every merge method and page "
                    "works on it, and reports ξ of a Task Arithmetic merge (default λ) before and after.")
    parser.add_argument("--zoo", metavar="DIR", required=True, help="the zoo whose experts to adapt")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the adapted zoo (new or empty)")
    group = parser.add_argument_group("RI settings (demo defaults; each help names the paper value where one is known)")
    for field in dataclasses.fields(RIConfig):
        add_field_argument(group, field, default=field.default, default_text=str(field.default))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapted zoo at --out")
    parser.add_argument("--no-xi", dest="xi", action="store_false",
                        help="skip measuring ξ of the Task Arithmetic merge before and after")
    parser.add_argument("--xi-max-samples", type=int, default=None, metavar="N",
                        help="measure ξ on the first N test images per task (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print a JSON result instead of a summary")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..methods.ri import adapt_zoo
    from ..zoo.manifest import load_zoo

    config = RIConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RIConfig)})
    validate_config(config)  # before any file is read
    if args.xi_max_samples is not None and args.xi_max_samples < 1:
        raise ConfigError(f"--xi-max-samples must be at least 1, got {args.xi_max_samples}")
    device = resolve_device(args.device)
    zoo = load_zoo(args.zoo)
    result = adapt_zoo(zoo, args.out, config, device=device, overwrite=args.overwrite, measure_xi=args.xi,
                       xi_max_samples=args.xi_max_samples)
    payload = result.to_json()
    if args.json:
        print_json(payload)
        return 0
    t = payload["timings"]
    print(f"RI adapted {len(payload['tasks'])} experts of {payload['source_zoo']} -> {payload['out']}")
    print(f"  aux={config.aux} ({config.aux_size} images), α={config.alpha}, {config.steps} steps of "
          f"{config.batch_size}, lr {config.lr:g}; total {t['total_s']:.1f} s (adaptation {t['adapt_s']:.1f} s)")
    for s in payload["experts"]:
        print(f"    {s['task']:>16}: L_RI on aux {s['aux_loss_before']:.4f} -> {s['aux_loss_after']:.4f} "
              f"(interference term {s['aux_interference_before']:.4f} -> {s['aux_interference_after']:.4f}), "
              f"{s['seconds']:.1f} s")
    if payload.get("xi_task_arithmetic"):
        xi = payload["xi_task_arithmetic"]
        print(f"  ξ of Task Arithmetic (λ {xi['hyperparameters']['lam']}) against the original experts: "
              f"{xi['before']['total']:.4f} -> {xi['after']['total']:.4f} nats (sum over tasks)")
    return 0
