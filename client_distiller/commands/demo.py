"""The main job on the embedded default, end to end, as a newcomer's first command runs it:

1. build the offline `fashion-domains` benchmark (client split) unless it is there;
2. build the vendor's demo teacher (cached after the first time) and start a real vendor process
   on 127.0.0.1 with its embedded Redis;
3. create an API key, then run `client-distill distill` against it under a budget;
4. print the result table (teacher zero-shot, ERM, VL2V-ADiP; ID and OOD) and what was spent.

Everything lives under `--workdir` (default `var/demo`); a second run reuses the data, the
teacher and the embedding cache, so it spends 0 units on teacher queries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from client_distiller.commands.argtypes import non_negative_int, positive_int
from client_distiller.commands.setup import DEMO_WORKDIR, local_vendor, offline_benchmark
from client_distiller.training.recipe import CPU_RECIPE, Schedule

DEMO_METHODS = ("erm", "vl2v-adip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="client-distill demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=DEMO_WORKDIR, help="teacher, vendor, data, cache and run folder")
    parser.add_argument("--data-size", choices=["tiny", "small", "full"], default="small",
                        help="offline benchmark preset (default small)")
    parser.add_argument("--teacher-size", choices=["tiny", "full"], default="full",
                        help="demo teacher size (default full; tiny: seconds to build, for tests)")
    parser.add_argument("--budget", type=non_negative_int, default=2500, help="units for training targets")
    parser.add_argument("--eval-budget", type=non_negative_int, default=1000, help="units for the teacher zero-shot row")
    parser.add_argument("--test-domain", action="append", dest="test_domains", default=None,
                        help="held-out domain (repeatable); default: sketch")
    parser.add_argument("--steps", type=positive_int, default=CPU_RECIPE.steps, help="steps per backbone training stage")
    parser.add_argument("--align-steps", type=positive_int, default=CPU_RECIPE.align_steps,
                        help="steps of VL2V-ADiP's Align stage (on cached features)")
    parser.add_argument("--batch-size", type=positive_int, default=CPU_RECIPE.batch_size, help="images per source domain per step")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the teacher's input size")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="trial seed (splits, initialisation, order)")
    parser.add_argument("--hparam", action="append", dest="hparams", metavar="METHOD.NAME=VALUE", default=[],
                        help="method hyperparameters on top of the shared recipe's (client_distiller/training/recipe.py)")


def run_demo(args: argparse.Namespace) -> int:
    from client_distiller.commands.distill import DistillConfig, run_distill
    from client_distiller.training.methods import parse_hparams
    from client_distiller.settings import ClientSettings

    work = args.workdir.resolve()
    print(f"[1/4] offline benchmark ({args.data_size}) in {work}", flush=True)
    data_dir = offline_benchmark(work, args.data_size)
    print("[2/4] demo teacher (EfficientNet-Lite2 + MiniLM, LiT-aligned; built once, then cached)", flush=True)
    quota = args.budget + args.eval_budget
    with local_vendor(work, teacher_size=args.teacher_size, quota=quota, key_prefix="demo") as access:
        print(f"[3/4] vendor ready at {access.url} (log: {access.vendor.log_path}); key created with quota {quota}",
              flush=True)
        cfg = DistillConfig(
            settings=ClientSettings(vendor_url=access.url, api_key=access.api_key, budget=args.budget,
                                    eval_budget=args.eval_budget, cache_dir=work / "cache"),
            data=data_dir, out=work / "run",
            schedule=Schedule("efficientnet-lite0", steps=args.steps, align_steps=args.align_steps,
                              batch_size=args.batch_size, image_size=args.image_size, eval_every=CPU_RECIPE.eval_every),
            test_domains=tuple(args.test_domains or ["sketch"]), methods=DEMO_METHODS,
            hparams=parse_hparams(CPU_RECIPE.hparams_for(DEMO_METHODS, args.hparams), DEMO_METHODS), seed=args.seed)
        print("[4/4] buying teacher embeddings and distilling", flush=True)
        summary = run_distill(cfg)
        usage = access.vendor.admin("list")
    print()
    print(summary["table"])
    print(f"Units spent: training {summary['units_train']} (budget {summary['budget']}), evaluation "
          f"{summary['units_eval']} (budget {summary['eval_budget']}); images bought "
          f"{summary['images_bought']}/{summary['images_wanted']}, prompts {summary['prompts']}.")
    if "student_ms_per_image" in summary:
        print(f"Deployed student: {summary['student_params_m']}M parameters, {summary['student_mib_fp32']} MiB fp32, "
              f"{summary['student_ms_per_image']} ms/image on this CPU (teacher costs: "
              "benchmarks/results/student_latency.md); plot: " + summary["plot"])
    print("Vendor's view of the keys:\n" + usage.strip())
    for domain, students in summary["students"].items():
        for method, folder in students.items():
            print(f"Deployable {method} student (test domain {domain}): {folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    return run_demo(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
