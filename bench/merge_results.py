"""Merge the per-method results of several `offline.py` runs into one table and plots.

    python bench/merge_results.py bench/results/A bench/results/B --out bench/results/merged

Useful when configurations were run in separate sittings (e.g. batch 64 for fewer methods). Every
run of every folder is kept; groups are kept apart per folder, so each method's "x plain" is still
taken against the plain runs it was interleaved with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (base_tree, chain_heads_for, chain_heads_note, copy_latest, default_heads,  # noqa: E402
                    default_model, make_method, write_json)
from offline import cold_warm_table, plots, summarize, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--latest", default="bench/latest")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="relabel a method (e.g. runs made when an option had another default)")
    args = p.parse_args()
    rename = dict(r.split("=", 1) for r in args.rename)
    model, heads = default_model(), default_heads()
    base, base_src = base_tree(heads, None)
    runs: list[dict] = []
    seen: set[str] = set()
    for i, folder in enumerate(args.folders):
        for r in json.loads((folder / "raw.json").read_text())["runs"]:
            method = rename.get(r["method"], r["method"])
            runs.append({**r, "method": method, "group": f"{i}:{r.get('group', 0)}"})
            seen.add(method)
    order = ["plain", "medusa_chain", "ngram"] + sorted(m for m in seen if m not in ("plain", "medusa_chain", "ngram"))
    chain_heads = chain_heads_for(heads)
    methods = [make_method(n, model, heads, base, base_src, chain_heads) for n in order if n in seen]
    rows = summarize(methods, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "raw.json", {"runs": runs, "folders": [str(f) for f in args.folders],
                                       "renamed": rename})
    write_json(args.out / "summary.json", {"rows": rows})
    text = (f"# Offline benchmark (merged from {', '.join(f.name for f in args.folders)})\n\n"
            f"model `{Path(model).name}`, heads `{Path(heads).name}`"
            f"{chain_heads_note(Path(heads).name, Path(chain_heads).name, sorted(seen))}, base tree {base_src} "
            f"({len(base)} nodes); MT-Bench first turns, 128 max tokens, median tokens/s."
            + (f" Relabelled: {', '.join(f'{a} as {b}' for a, b in rename.items())}." if rename else "")
            + "\n\n" + (f"Greedy, x plain decoding, cold (fresh engine, nothing excluded) and warm:\n\n{cw}\n"
                          if (cw := cold_warm_table(rows)) else "")
            + table(rows))
    (args.out / "table.md").write_text(text)
    pngs = plots(rows, args.out)
    copy_latest([args.out / "table.md", args.out / "summary.json", *pngs], args.latest)
    print(text)


if __name__ == "__main__":
    main()
