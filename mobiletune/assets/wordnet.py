"""An instruction-style data set from WordNet: ``{"prompt": "Define <term>", "response":
<gloss>}`` records, one per noun synset, written as JSONL for the data pipeline.

WordNet's data.noun lines read ``offset lex_filenum ss_type w_cnt(hex) word lex_id ...
| gloss``; the gloss is a definition optionally followed by ``; "example"`` quotes, which
we drop. Terms use ``_`` for spaces. A deterministic subset (every k-th synset) keeps the
set small enough to tokenize quickly.
"""

from __future__ import annotations

import json
from pathlib import Path

from mobiletune import assets
from mobiletune.io.atomic import write_text as write_text_atomic


def definitions(data_noun: Path) -> list[dict]:
    out = []
    for line in data_noun.read_text(encoding="utf-8", errors="strict").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        head, gloss = line.split("|", 1)
        fields = head.split()
        term = fields[4].replace("_", " ")
        definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
        if definition:
            out.append({"prompt": f"Define {term}", "response": definition})
    return out


def build_jsonl(limit: int = 4000) -> Path:
    """The cached JSONL of ``limit`` records spread evenly over all noun synsets."""
    out = assets.cache_dir() / f"wordnet-define-{limit}.jsonl"
    if out.is_file():
        return out
    recs = definitions(assets.wordnet_nouns())
    step = max(1, len(recs) // limit)
    chosen = recs[::step][:limit]
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
    return out
