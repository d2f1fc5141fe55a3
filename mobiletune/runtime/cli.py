"""``mobiletune device ...`` and ``python -m mobiletune.runtime ...``: the phone's commands
(they need only the runtime extra: numpy, ai-edge-litert, tokenizers).

Exit status: 0 done; 1 ``doctor`` found problems; 2 a user mistake (one line
``mobiletune: error: ...``, no traceback); 3 ``train`` stopped before its last step (by the
battery, a signal or a stop) with a checkpoint to ``--resume`` from; 130 interrupted.
Results go to stdout; progress and information to stderr.
"""

from __future__ import annotations

import argparse
import sys

from mobiletune.errors import MobiletuneError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The options ``mobiletune generate`` and ``mobiletune device generate`` share."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template; stop at its "
                        "end-of-turn token")
    p.add_argument("--max-new-tokens", type=int, default=48, help="at most this many (48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")


def build_parser(prog: str = "python -m mobiletune.runtime") -> argparse.ArgumentParser:
    from mobiletune.runtime.energy.battery import providers_help
    ap = argparse.ArgumentParser(prog=prog, description="Train or run a LiteRT training bundle "
                                                        "on this device.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="fine-tune a bundle on local text/JSONL data")
    p.add_argument("bundle", help="bundle directory (from `mobiletune export`)")
    p.add_argument("--data", required=True, nargs="+", help="UTF-8 text or JSONL file(s)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--battery", default="auto", help=f"battery readings: {providers_help()} "
                                                     f"(default auto)")
    p.add_argument("--thresholds", metavar="FILE",
                   help="a JSON object of scheduler thresholds (pause_below, hot_c, ...) that "
                        "override the bundle's (from the recipe's `thresholds`)")
    p.add_argument("--threads", type=int,
                   help="LiteRT interpreter threads (default: the cores this process may use)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--memory-budget-mb", type=float,
                   help="sharded bundles: memory this process may use; the headroom left "
                        "after the first micro-batch goes first to saved residuals (the last "
                        "layers' backward passes then skip recomputing their matmuls: faster), "
                        "then to layer weights kept between the forward and backward passes "
                        "(default: no budget, so save and keep none: least memory)")
    p.add_argument("--state-store", choices=("auto", "ram", "disk"), default="auto",
                   help="sharded bundles: keep the trainable state (parameters, gradients, "
                        "optimizer moments) in RAM or stream it shard by shard through a "
                        "memory-mapped file under --out; auto: the file when the state needs "
                        "more than half of --memory-budget-mb, or more than 256 MB without a "
                        "budget (a full fine-tune; LoRA stays in RAM)")
    p.add_argument("--head", choices=("host", "program"), default="program",
                   help="sharded bundles: run the head's vocabulary chunks (and a trained "
                        "head's gradient) as the bundle's head_fwd (head_wgrad) signature in "
                        "LiteRT (default) or in numpy on the host (faster "
                        "where numpy's BLAS beats LiteRT's matmul, as on the x86 machines "
                        "measured; call it from the main thread only: OpenBLAS hung when called "
                        "from another thread)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("generate", help="generate with the bundle's weights (KV cache)",
                       description="Generate from a prompt with the bundle's weights (and a "
                                   "`train` run's state): one prefill over the prompt, then one "
                                   "decode step per token over a KV cache.")
    p.add_argument("bundle")
    add_generation_options(p)
    p.add_argument("--state", help="a `device train` output directory (its state.safetensors)")
    p.add_argument("--side-weights", metavar="FILE",
                   help="side-tuning bundles: the trained side network (side.safetensors from "
                        "`device side-train` or the server)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix with `infer` for every token (the "
                        "pre-cache path; same tokens, slower)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("side-train", help="server-assisted side-tuning: run the frozen backbone "
                                          "forward and stream its activations to a server",
                       description="Send a side-tuning bundle's activations (quantized as its "
                                   "recipe's side section says) to `mobiletune side serve`, "
                                   "which trains the side network; then fetch the side weights "
                                   "into OUT/side.safetensors. No backward pass on the phone.")
    p.add_argument("bundle", help="a bundle exported with `mobiletune export --side`")
    p.add_argument("--data", required=True, nargs="+", help="UTF-8 text or JSONL file(s)")
    p.add_argument("--server", required=True, metavar="URL", help="http(s)://host:port")
    p.add_argument("--token-file", required=True,
                   help="one line '<device> <token>' (the server's token file; keep it 0600)")
    p.add_argument("--cafile", help="the server's TLS certificate (or its CA) to trust")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--battery", default="auto", help=f"as for train: {providers_help()}")
    p.add_argument("--thresholds", metavar="FILE", help="as for train")
    p.add_argument("--threads", type=int)
    p.add_argument("--max-offline", type=float, default=600, metavar="SECONDS",
                   help="stop (with the cursor saved) after the server is unreachable this "
                        "long (600)")
    p.add_argument("--resume", action="store_true", help="continue from where the server is")
    p.set_defaults(func=cmd_side_train)
    p = sub.add_parser("doctor", help="check this device (and a bundle): architecture, memory, "
                                      "storage, battery, LiteRT, one timed micro-step",
                       description="Print what this device offers and, given a bundle, whether "
                                   "it can train it: one 'problem: ...' line per problem, exit "
                                   "status 1 if there is any.")
    p.add_argument("bundle", nargs="?", help="a bundle directory to check (optional)")
    p.add_argument("--threads", type=int)
    p.add_argument("--battery", default="auto", help="battery source to check (default auto)")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("kit", help="(desktop) pack a bundle, a wheel of this mobiletune and the "
                                   "aarch64 wheels of the runtime into an offline phone kit",
                       description="Write KIT/ and KIT.tar.gz: the bundle, wheels for aarch64 "
                                   "glibc Linux (Debian/Ubuntu under Termux's proot-distro; not "
                                   "Termux's own Python) and setup.sh, which installs them with no "
                                   "network. Needs pip and the package registry on this machine.")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="kit directory to write (and OUT.tar.gz)")
    p.add_argument("--python", default="3.11,3.12,3.13",
                   help="CPython versions of the phone's userland (default 3.11,3.12,3.13: "
                        "Debian 12, Ubuntu 24.04, Debian 13)")
    p.add_argument("--wheel", help="a mobiletune wheel to use instead of building one from "
                                   "this source checkout")
    p.add_argument("--no-tar", action="store_true", help="skip the .tar.gz")
    p.add_argument("--fed", action="store_true",
                   help="also carry Flower (the fed extra's pinned flwr, without the simulation "
                        "engine) so the phone can run flower-supernode with the federated ClientApp")
    p.set_defaults(func=cmd_kit)
    return ap


def cmd_train(args) -> int:
    from mobiletune.runtime.device_trainer import device_train, load_thresholds
    from mobiletune.runtime.metrics import peak_rss_mb
    th = load_thresholds(args.thresholds) if args.thresholds else None
    r = device_train(args.bundle, args.data, args.out, steps=args.steps, battery=args.battery,
                     threads=args.threads, resume=args.resume, thresholds=th,
                     checkpoint_every=args.checkpoint_every,
                     memory_budget_mb=args.memory_budget_mb, state_store=args.state_store,
                     head=args.head)
    if r.finished:
        print(f"done: {r.step} steps; peak RSS {peak_rss_mb():.0f} MB; outputs in {r.out}")
        return EXIT_OK
    print(f"stopped at step {r.step} ({r.stopped_by}); checkpoint saved, continue with "
          f"--resume")
    return EXIT_STOPPED


def cmd_generate(args) -> int:
    from mobiletune.runtime.device_trainer import device_generate
    text, tps = device_generate(args.bundle, args.prompt, args.state, args.max_new_tokens,
                                args.threads, chat=args.chat, temperature=args.temperature,
                                seed=args.seed, side_weights=args.side_weights,
                                cache=not args.no_cache)
    print(text)
    how = ("prefix recomputed per token" if args.no_cache or args.side_weights
           else "KV cache")
    print(f"[{tps:.1f} tokens/s, {how}]", file=sys.stderr)
    return EXIT_OK


def cmd_side_train(args) -> int:
    from mobiletune.runtime.device_trainer import load_thresholds
    from mobiletune.runtime.side.trainer import device_side_train
    th = load_thresholds(args.thresholds) if args.thresholds else None
    r = device_side_train(args.bundle, args.data, args.out, args.server, args.token_file,
                          args.cafile, steps=args.steps, battery=args.battery,
                          threads=args.threads, resume=args.resume, thresholds=th,
                          max_offline_s=args.max_offline)
    if r.finished:
        print(f"done: {r.step} steps sent and trained; side weights in {r.out}/side.safetensors")
        return EXIT_OK
    print(f"stopped at step {r.step} ({r.stopped_by}); continue with --resume")
    return EXIT_STOPPED


def cmd_doctor(args) -> int:
    from mobiletune.runtime.doctor import doctor
    return doctor(args.bundle, threads=args.threads, battery=args.battery)


def cmd_kit(args) -> int:
    from mobiletune.runtime.kit import build_kit, parse_pythons
    info = build_kit(args.bundle, args.out, parse_pythons(args.python), wheel=args.wheel,
                     tar=not args.no_tar, fed=args.fed, log=lambda s: print(s, file=sys.stderr))
    print(f"kit {args.out}: {info['bytes']:,} bytes, {len(info['wheels'])} wheels for Python "
          f"{', '.join(info['pythons'])}"
          + (f"; {args.out}.tar.gz {info['archive_bytes']:,} bytes" if "archive_bytes" in info
             else ""))
    return EXIT_OK


def run(args) -> int:
    """Call ``args.func``; a user mistake prints one line and exits 2, no traceback."""
    try:
        return args.func(args)
    except MobiletuneError as e:
        print(f"mobiletune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mobiletune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv=None, prog: str = "python -m mobiletune.runtime") -> int:
    return run(build_parser(prog).parse_args(argv))
