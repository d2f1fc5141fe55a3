"""``python -m export RECIPE.py --out BUNDLE [--set key=value ...] [--variants 1,2,4]
[--sharded [--store-dtype float16]]`` (also ``mobiletune export``): trace a recipe into a
LiteRT training bundle."""

from __future__ import annotations

import argparse
import sys

from mobiletune.errors import MobiletuneError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobiletune export",
                                 description="Trace a recipe into a LiteRT training bundle "
                                             "(builtin ops only), verified in a fresh process.")
    ap.add_argument("recipe", help="recipe file")
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field (as for `mobiletune train`)")
    ap.add_argument("--variants", default=None,
                    help="micro-batch sizes to export, comma-separated (default: every divisor "
                         "of the effective batch up to micro_batch)")
    ap.add_argument("--sharded", action="store_true",
                    help="per-block signatures with the weights streamed from a store on disk "
                         "(any model size; the phone's memory is about one layer's weights "
                         "plus activations); default: one monolithic program (<= 150M params)")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "int8"],
                    help="sharded only: dtype of the frozen weights in the store (float16 "
                         "halves the bundle; int8, with one scale per output channel, "
                         "quarters it; they are widened to float32 per layer)")
    ap.add_argument("--side", action="store_true",
                    help="a side-tuning bundle (the recipe's side= section): the backbone's "
                         "per-block forward for `device side-train` plus the side network's "
                         "program for generation; weights streamed as --sharded")
    ap.add_argument("--no-verify", action="store_true", help="skip the fresh-process check")
    args = ap.parse_args(argv)
    try:
        from export.common import default_variants
        from export.monolithic_bundle import export_bundle
        from mobiletune.train.recipe import apply_overrides, load_recipe
        recipe = apply_overrides(load_recipe(args.recipe), args.set)
        if args.variants:
            try:
                variants = [int(v) for v in args.variants.split(",")]
            except ValueError:
                raise MobiletuneError(f"--variants {args.variants!r}: expected integers") from None
        else:
            variants = default_variants(recipe)
        if args.side:
            from export.side_bundle import export_side
            rep = export_side(recipe, args.out, variants, args.store_dtype,
                              verify=not args.no_verify)
        elif args.sharded:
            from export.sharded_bundle import export_sharded
            rep = export_sharded(recipe, args.out, variants, args.store_dtype,
                                 verify=not args.no_verify)
        elif args.store_dtype != "float32":
            raise MobiletuneError("--store-dtype applies to --sharded and --side bundles only")
        else:
            rep = export_bundle(recipe, args.out, variants, verify=not args.no_verify)
    except MobiletuneError as e:
        print(f"mobiletune: error: {e}", file=sys.stderr)
        return 2
    from export.common import summary
    print(summary(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
