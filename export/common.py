"""What both exporters share: variant checks, the manifest fields that do not depend on the
program's kind, the fresh-process verification, and the report each bundle carries."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import mobiletune
from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic
from mobiletune.runtime.bundle import REPORT, TOKENIZER_FILES, file_entry
from mobiletune.train.recipe import Recipe

# Exported programs write every product as a batched matmul (models.layers.MATMUL_FORMS:
# LiteRT runs the FULLY_CONNECTED that einsum becomes on a slow path for weights that are
# inputs or variables).
EXPORT_MATMUL = "batch_matmul"
TOOLS = ("jax", "optax", "tensorflow-cpu", "tensorflow", "ai-edge-litert", "numpy")


class ExportError(MobiletuneError):
    """A recipe or model that cannot become a bundle (the message says why)."""


def tool_versions() -> dict:
    out = {"mobiletune": mobiletune.__version__}
    for dist in TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def check_variants(recipe: Recipe, variants) -> tuple[int, ...]:
    variants = tuple(sorted(set(int(v) for v in variants)))
    if not variants or min(variants) < 1:
        raise ExportError(f"--variants {variants}: need positive micro-batch sizes")
    bad = [v for v in variants if recipe.batch_size % v]
    if bad:
        raise ExportError(f"--variants {bad}: each micro-batch size must divide the effective "
                          f"batch {recipe.batch_size} (micro_batch × accumulation), so any "
                          f"variant can make up a whole optimizer step")
    return variants


def default_variants(recipe: Recipe) -> list[int]:
    """Every divisor of the effective batch up to ``micro_batch``."""
    return [v for v in range(1, recipe.micro_batch + 1) if recipe.batch_size % v == 0]


def manifest_fields(recipe: Recipe, cfg, lcfg, tok, variants) -> dict:
    """The ``Manifest`` fields both kinds of bundle fill the same way."""
    return dict(model=cfg.to_dict(), lora=lcfg.to_dict() if lcfg else None,
                optim=recipe.optim_config().to_dict(), data=recipe.data_config().to_dict(),
                recipe=recipe.to_dict(), seq_len=recipe.seq_len, variants=tuple(variants),
                effective_batch=recipe.batch_size, steps=recipe.steps,
                tokenizer={"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                           "adds_bos": tok.adds_bos},
                tools=tool_versions(), hf_config=cfg.to_hf_dict(), base_model=recipe.model,
                thresholds=recipe.thresholds.to_dict())


def tokenizer_files(tok, tmp: Path) -> dict:
    tok.save(tmp)
    return {n: file_entry(tmp, n) for n in TOKENIZER_FILES}


def verify_in_fresh_process(bundle: Path) -> None:
    """Load the bundle where only the phone's packages are imported (no JAX, no TF)."""
    r = subprocess.run([sys.executable, "-m", "mobiletune.runtime.verify", str(bundle)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ExportError(f"{bundle}: verification in a fresh LiteRT process failed: "
                          f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def write_report(bundle: Path, rep: dict) -> dict:
    """``report.json`` in the bundle: what the export measured (not part of the contract)."""
    rep = {**rep, "bundle_bytes": sum(p.stat().st_size for p in Path(bundle).iterdir()
                                      if p.name != REPORT)}
    atomic.write_text(Path(bundle) / REPORT, json.dumps(rep, indent=1) + "\n")
    return rep


def summary(rep: dict) -> str:
    """One line for the terminal (the details are in ``report.json``)."""
    kind = f"sharded, {rep['store_dtype']} store" if rep.get("sharded") else "monolithic"
    return (f"bundle {rep['bundle']} ({kind}): {rep['bundle_bytes']:,} bytes, "
            f"{rep['params']:,} params ({rep['trainable_params']:,} trainable), variants "
            f"{rep['variants']}, {rep['export_seconds']:.1f} s, peak RSS "
            f"{rep['peak_rss_mb']:.0f} MB; details in {rep['bundle']}/{REPORT}")
