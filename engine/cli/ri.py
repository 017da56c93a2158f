"""`python -m engine ri`: Resolving Interference, adapting a suite's experts (docs/methods.md, RI)."""
from __future__ import annotations

import argparse
import dataclasses

from ..adapted import check_out_dir, write_adapted_suite_file, write_adapted_zoo
from ..device import resolve_device
from ..methods.base import validate_config
from ..methods.ri import RIConfig, adapt_suite, xi_before_after
from ..runs import describe_source
from ..suite_file import load_suite_file
from ..zoo.suite import ZooSuite
from .common import add_record_argument, print_json, record_run
from .method_args import add_field_argument
from .sources_args import add_suite_arguments, suite_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ri", help="Resolving Interference: adapt every expert on unlabeled auxiliary images",
        description="Adapt each expert so that under its own head it still matches itself while under every other "
                    "task's head it matches the pretrained model, using only unlabeled auxiliary images "
                    "(docs/methods.md). For --zoo, writes a zoo in the same format to --out (use it with --zoo); "
                    "for --suite, writes the adapted experts and DIR/suite.toml (use it with --suite). Reports ξ "
                    "of a Task Arithmetic merge (default λ) before and after.")
    add_suite_arguments(parser)
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the adapted experts (new or empty)")
    group = parser.add_argument_group("RI settings (demo defaults; each help names the paper value where one is known)")
    for field in dataclasses.fields(RIConfig):
        add_field_argument(group, field, default=field.default, default_text=str(field.default))
    parser.add_argument("--overwrite", action="store_true", help="replace existing adapted experts at --out")
    parser.add_argument("--no-xi", dest="xi", action="store_false",
                        help="skip measuring ξ of the Task Arithmetic merge before and after")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print a JSON result instead of a summary")
    add_record_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = RIConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RIConfig)})
    validate_config(config)  # before any file is read
    device = resolve_device(args.device)
    suite = suite_from_args(args)
    out = check_out_dir(suite, args.out, args.overwrite)
    adapted, result = adapt_suite(suite, config, device=device)
    if suite.kind == "zoo":
        adapted_suite = ZooSuite.load(write_adapted_zoo(suite, out, adapted, result))
        result.out = str(out)
    else:
        result.out = str(write_adapted_suite_file(suite, out, adapted, result))
        adapted_suite = load_suite_file(result.out, limit=args.limit)
    if args.xi:
        result.xi_task_arithmetic = xi_before_after(suite, adapted_suite, limit=args.limit)
    payload = result.to_json()
    record_run(args, "ri", payload, method="ri", config=dataclasses.asdict(config),
               source=describe_source(suite, args.limit), device=str(device), timings=payload.get("timings"))
    if args.json:
        print_json(payload)
        return 0
    t = payload["timings"]
    print(f"RI adapted {len(payload['tasks'])} experts of {payload['suite']} -> {payload['out']}")
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
