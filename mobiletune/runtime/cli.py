"""``mobiletune device ...`` and ``python -m mobiletune.runtime ...``: the phone's commands
(they need only the runtime extra: numpy, ai-edge-litert, tokenizers)."""

from __future__ import annotations

import argparse
import sys

from mobiletune.errors import MobiletuneError


def build_parser(prog: str = "python -m mobiletune.runtime") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train or run a LiteRT training bundle "
                                                        "on this device.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="fine-tune a bundle on local text/JSONL data")
    p.add_argument("bundle", help="bundle directory (from `mobiletune export`)")
    p.add_argument("--data", required=True, nargs="+", help="UTF-8 text or JSONL file(s)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--battery", default="auto",
                   help="auto | sysfs | termux | trace:FILE | none (default auto: sysfs if a "
                        "battery is found, else termux-battery-status, else none)")
    p.add_argument("--threads", type=int,
                   help="LiteRT interpreter threads (default: the cores this process may use)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--memory-budget-mb", type=float,
                   help="sharded bundles: memory this process may use; the headroom left "
                        "after the first micro-batch keeps layer weights between the forward "
                        "and backward passes instead of re-reading them (default: keep none)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("generate", help="greedy generation with the bundle's infer signature")
    p.add_argument("bundle")
    p.add_argument("--prompt", required=True)
    p.add_argument("--state", help="a `device train` output directory (its state.safetensors)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_generate)
    return ap


def cmd_train(args) -> int:
    from mobiletune.runtime.device import device_train
    r = device_train(args.bundle, args.data, args.out, steps=args.steps, battery=args.battery,
                     threads=args.threads, resume=args.resume,
                     checkpoint_every=args.checkpoint_every,
                     memory_budget_mb=args.memory_budget_mb)
    if r.finished:
        from mobiletune.runtime.metrics import peak_rss_mb
        print(f"done: {r.step} steps; peak RSS {peak_rss_mb():.0f} MB; outputs in {r.out}")
    else:
        print(f"stopped at step {r.step} ({r.stopped_by}); checkpoint saved, continue with "
              f"--resume")
    return 0 if r.finished else 3


def cmd_generate(args) -> int:
    from mobiletune.runtime.device import device_generate
    text, tps = device_generate(args.bundle, args.prompt, args.state, args.max_new_tokens,
                                args.threads)
    print(text)
    print(f"[{tps:.1f} tokens/s, prefix recomputed per token]", file=sys.stderr)
    return 0


def run(args) -> int:
    """Call ``args.func``; a user mistake prints one line and exits 2, no traceback."""
    try:
        return args.func(args)
    except MobiletuneError as e:
        print(f"mobiletune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobiletune: interrupted", file=sys.stderr)
        return 130


def main(argv=None, prog: str = "python -m mobiletune.runtime") -> int:
    return run(build_parser(prog).parse_args(argv))
