"""``mobiletune fed run FED_RECIPE.py --clients N --rounds R --out DIR [--set key=value ...]``:
prepare the run directory (the resolved recipe, one bundle per LoRA rank, the data
partition, the device profiles, ``fed.json``) and run it on Flower's simulation engine.
A ``profiles.json`` already in DIR is used as it is (edit it to define the devices);
``--resume`` continues a run whose server was stopped (from its last completed round)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from mobiletune.errors import MobiletuneError
from mobiletune.fed import partition as PT
from mobiletune.fed import profiles as P
from mobiletune.fed import spec as S
from mobiletune.io import atomic


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_parser(sub) -> None:
    p = sub.add_parser("fed", help="federated fine-tuning on Flower: `mobiletune fed run`")
    fsub = p.add_subparsers(dest="fed_command", required=True, metavar="COMMAND")
    q = fsub.add_parser("run", help="a federated run on the simulation engine")
    q.add_argument("recipe", help="a federated recipe (recipe = Recipe(...), fed = FedConfig(...))")
    q.add_argument("--clients", type=int, help="number of clients (default: the recipe's)")
    q.add_argument("--rounds", type=int, help="number of rounds (default: the recipe's)")
    q.add_argument("--out", required=True, help="the run directory")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a FedConfig or Recipe field (repeatable)")
    q.add_argument("--resume", action="store_true", help="continue from the last completed round")
    b = fsub.add_parser("bench", help="EdgeFlowerTune's protocols over runs: a table + figures")
    b.add_argument("protocol", help="quality-under-budget | cost-to-target | robustness | all")
    b.add_argument("--out", required=True, help="where the tables and figures go")
    b.add_argument("--runs", nargs="*", default=[], metavar="NAME=DIR", help="finished runs")
    b.add_argument("--recipe", help="a federated recipe: run --methods (and --dropouts) first "
                                    "into OUT/<method>[-drop<p>] on one partition and bundle set")
    b.add_argument("--methods", default="fedavg,fedprox,flexlora,local-only,centralized")
    b.add_argument("--dropouts", default="", help="robustness: e.g. 0,0.2,0.4 (first is clean)")
    b.add_argument("--clients", type=int)
    b.add_argument("--rounds", type=int)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--clean", help="robustness: the name of the clean run")
    for k in ("budget-bytes", "budget-wall", "budget-energy", "target-ppl"):
        b.add_argument(f"--{k}", type=float)
    p.set_defaults(func=main)


def export(recipe_file: Path, out: Path, rank: int, variants, sharded: bool) -> Path:
    if (out / "manifest.json").exists():
        return out
    cmd = [sys.executable, "-m", "mobiletune", "export", str(recipe_file), "--out", str(out),
           "--variants", ",".join(map(str, variants)), "--set", f"lora.r={rank}"]
    if sharded:
        cmd.append("--sharded")
    info(f"fed: exporting the rank-{rank} bundle to {out}")
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise MobiletuneError(f"export of {recipe_file} (rank {rank}) failed with status {r.returncode}")
    return out


def prepare(recipe, fed, out: Path, bundle_root: Path | None = None) -> S.RunSpec:
    """Write everything a run needs into ``out`` (idempotent: bundles already there stay);
    ``bundle_root``: where the bundles go (several runs of a bench share them)."""
    from mobiletune.fed import tasks
    out.mkdir(parents=True, exist_ok=True)
    rfile = out / "recipe.py"
    atomic.write_text(rfile, "from mobiletune.runtime.energy.scheduler import Thresholds\n"
                             "from mobiletune.runtime.side.config import SideConfig\n"
                             "from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe\n"
                             f"recipe = {recipe!r}\n")
    atomic.write_text(out / "fed_config.json", json.dumps(fed.__dict__, indent=1, default=list) + "\n")
    base_r = recipe.lora.r
    ranks = sorted(set(fed.ranks) | {base_r}) if fed.method == "flexlora" else [base_r]
    broot = bundle_root or out / "bundles"
    sharded = fed.sharded or fed.method == "splitlora"   # SplitLoRA cuts a sharded bundle
    # a bench's runs share ``bundle_root``: SplitLoRA's forced sharded bundles go beside
    # the other methods' monolithic ones, not over them
    suffix = "-sharded" if sharded and not fed.sharded else ""
    bundles = {f"r{r}": str(export(rfile, broot / f"r{r}{suffix}", r, fed.variants, sharded))
               for r in ranks}
    if fed.partition == "shakespeare-roles":
        clients = PT.shakespeare_roles(fed.clients, fed.seed)
        PT.write(out, clients, None, "txt", {"partition": fed.partition, "seed": fed.seed})
        kind = "txt"
    else:
        clients, gval = PT.wordnet_dirichlet(fed.clients, fed.alpha, fed.seed, fed.per_client)
        PT.write(out, clients, gval, "jsonl", {"partition": fed.partition, "alpha": fed.alpha,
                                               "seed": fed.seed})
        kind = "jsonl"
    if fed.mc_items:
        tasks.write(out / "partition" / "mc.jsonl",
                    tasks.build(PT.wordnet_records(), fed.mc_items, fed.seed))
    if not (out / P.FILE).exists():
        n = max(len(fed.speeds), len(fed.ranks) or 1)
        profs = {f"device{i}": P.DeviceProfile(
            speed=fed.speeds[i % len(fed.speeds)], dropout=fed.dropout,
            lora_rank=fed.ranks[i % len(fed.ranks)] if fed.ranks else None) for i in range(n)}
        P.write(out / P.FILE, P.Profiles(fed.seed, profs, list(profs)))
    spec = S.RunSpec(method=fed.method, rounds=fed.rounds, local_steps=fed.local_steps,
                     clients=fed.clients, mu=fed.mu, optimizer_state=fed.optimizer_state,
                     seed=fed.seed, deadline_s=fed.deadline_s, fraction_evaluate=fed.fraction_evaluate,
                     eta=fed.eta, eval_max_examples=fed.eval_max_examples, mc_items=fed.mc_items,
                     bundles=bundles, default_bundle=f"r{base_r}", data_kind=kind, cut=fed.cut,
                     split_host=fed.split_host, split_port=fed.split_port,
                     split_tls_cert=fed.split_tls_cert, split_tls_key=fed.split_tls_key)
    S.write(out, spec)
    return spec


def run(recipe_path, out, clients=None, rounds=None, sets=(), resume=False,
        bundle_root=None) -> list[dict]:
    from mobiletune.fed import recipe as FR
    from mobiletune.fed.server_app import LOG, read_log
    from mobiletune.fed.sim import simulate
    out = Path(out)
    recipe, fed = FR.override(*FR.load(recipe_path), list(sets))
    fed = replace(fed, clients=clients or fed.clients, rounds=rounds or fed.rounds)
    if (out / "server" / "checkpoints").is_dir() and any((out / "server" / "checkpoints").iterdir()) \
            and not resume:
        raise MobiletuneError(f"{out}: holds a run already; pass --resume to continue it")
    spec = prepare(recipe, fed, out, bundle_root)
    if fed.method in ("local-only", "centralized"):
        from mobiletune.fed.baselines import run_baseline
        run_baseline(out, fed.method, log=info)
    else:
        simulate(out, spec.clients)
    rows = read_log(out / LOG, spec.rounds)
    if not rows or rows[-1]["round"] != spec.rounds:
        raise MobiletuneError(f"{out}: the run stopped before round {spec.rounds} "
                              f"(see {out / LOG}); continue with --resume")
    return rows


def cmd_bench(args) -> int:
    from mobiletune.fed.bench import bench
    from mobiletune.fed.server_app import LOG, read_log
    out = Path(args.out)
    runs = {}
    for item in args.runs:
        name, eq, d = item.partition("=")
        if not eq:
            raise MobiletuneError(f"--runs {item!r}: expected NAME=DIR")
        runs[name] = Path(d)
    clean = args.clean
    if args.recipe:
        drops = [float(x) for x in args.dropouts.split(",") if x.strip()] or [None]
        for m in [x.strip() for x in args.methods.split(",") if x.strip()]:
            for dp in drops:
                name = m if dp is None else f"{m}-drop{int(round(dp * 100))}"
                d = out / name
                sets = [*args.set, f"method={m}"] + ([] if dp is None else [f"dropout={dp}"])
                done = read_log(d / LOG, 10 ** 9) if (d / LOG).exists() else []
                if not done or done[-1]["round"] < (args.rounds or 0):
                    run(args.recipe, d, args.clients, args.rounds, sets, resume=bool(done),
                        bundle_root=out / "bundles")
                runs[name] = d
                if dp is not None and clean is None:
                    clean = name
    res = bench(args.protocol, runs, out, clean, budget_bytes=args.budget_bytes,
                budget_wall=args.budget_wall, budget_energy=args.budget_energy,
                target_ppl=args.target_ppl)
    for p in [*res, "rounds"]:
        print((out / f"{p}.md").read_text())
    return 0


def main(args) -> int:
    if args.fed_command == "bench":
        return cmd_bench(args)
    rows = run(args.recipe, args.out, args.clients, args.rounds, args.set, args.resume)
    print("round  val_ppl  mc_acc  MB_total  wall_s  energy_J  rejected  failed")
    for r in rows:
        print(f"{r['round']:5d}  {r['val-ppl']:7.3f}  {r.get('mc-acc', float('nan')):6.3f}  "
              f"{r['bytes-total'] / 1e6:8.3f}  {r['wall-s']:6.1f}  {r['energy-j-total']:8.1f}  "
              f"{len(r.get('rejected', [])):8d}  {len(r.get('failed', [])):6d}")
    return 0


if __name__ == "__main__":  # python -m mobiletune.fed.cli run ...
    ap = argparse.ArgumentParser(prog="mobiletune")
    add_parser(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["fed", *sys.argv[1:]])
    sys.exit(a.func(a))
