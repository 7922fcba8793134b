"""Does the embedded default behave like MTIL? Runs the methods over seeds and both orders on the current code,
prints mean ± std tables and checks the four properties MTIL exists to measure:

1. plasticity: under finetune and lora the mean diagonal ``A[t, t]`` is >= 85 and every domain's >= 60;
2. zero-shot knowledge worth keeping: zero-shot Transfer >= 45, every chance level <= 20, and at least half of
   the domains after the first third of the order are partly known zero-shot (>= 2x chance);
3. erosion and forgetting: finetune and lora Transfer <= zero-shot Transfer - 6 and BWT <= -8;
4. separation: KeepLoRA Transfer >= zero-shot - 2 and >= LoRA + 4, ZSCL Transfer >= zero-shot - 3, KeepLoRA
   Last >= LoRA Last + 5, each by more than the pooled std of the two rows.

Beside these gates, the baselines of the MTIL tables (LwF, LwF-VR, iCaRL, WiSE-FT, MoE-Adapters, DIKI) are read
against the claim each paper makes of itself on MTIL (:data:`CLAIMS`). A claim is a reading, printed with its
margin, not a gate: the embedded default is not MTIL, and a claim it does not show is reported, never tuned away.

Usage::

    python -m benchmarks.embedded                      # 3 seeds x orders 1, 2 (the acceptance run; ~1 h on 2 cores)
    python -m benchmarks.embedded --seeds 0 --orders 1 # a quick look
    python -m benchmarks.embedded --out DIR --markdown table.md

Runs go to ``--out`` (default ``results-embedded``) through ``clbench run``; finished runs are reused (the run id
covers the code's configuration, not the code itself: delete the folder after changing the code). Exit status 1
when a check fails, so the script can gate a change.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

METHODS = ("zeroshot", "finetune", "lora", "keeplora", "zscl", "lwf", "lwf-vr", "icarl", "wise-ft", "moe-adapters",
           "diki")

# (label, method, metric, reference method, offset): each paper's MTIL claim, "method's metric >= reference's + offset".
# ZSCL's Table 3 rows: LwF, LwF-VR and WiSE-FT keep more Transfer than continual fine-tuning; iCaRL's replay keeps
# more of the past (Last) than fine-tuning. MoE-Adapters' DDAS and DIKI's calibration send unseen domains to the
# frozen zero-shot path: Transfer within 2 points of zero-shot, and Last above LoRA's.
CLAIMS: tuple[tuple[str, str, str, str, float], ...] = (
    ("LwF Transfer > fine-tuning Transfer", "lwf", "transfer", "finetune", 0.0),
    ("LwF-VR Transfer > fine-tuning Transfer", "lwf-vr", "transfer", "finetune", 0.0),
    ("WiSE-FT Transfer > fine-tuning Transfer", "wise-ft", "transfer", "finetune", 0.0),
    ("iCaRL Last > fine-tuning Last", "icarl", "last", "finetune", 0.0),
    ("MoE-Adapters Transfer >= zero-shot - 2", "moe-adapters", "transfer", "zeroshot", -2.0),
    ("MoE-Adapters Last > LoRA Last", "moe-adapters", "last", "lora", 0.0),
    ("DIKI Transfer >= zero-shot - 2", "diki", "transfer", "zeroshot", -2.0),
    ("DIKI Last > LoRA Last", "diki", "last", "lora", 0.0),
)


@dataclass
class Check:
    item: int
    order: int
    text: str
    ok: bool


def run_all(methods: list[str], orders: list[int], seeds: list[int], out: Path, preset: str) -> None:
    from clbench.cli.app import main

    for order in orders:
        for seed in seeds:
            code = main(["run", "--methods", ",".join(methods), "--order", str(order), "--seed", str(seed),
                         "--out", str(out), "--preset", preset, "--quiet"])
            if code not in (0, None):
                raise SystemExit(f"clbench run failed for order {order} seed {seed} (exit {code})")


def load(out: Path, method: str, order: int, seed: int) -> tuple[np.ndarray, list[str], list[float], dict]:
    folder = out / f"synthetic-order{order}" / method / f"seed{seed}"
    acc = pd.read_csv(folder / "accuracy.csv")
    names = [str(x) for x in acc["trained_on"]]
    zeroshot = pd.read_csv(folder / "zeroshot.csv")[names].to_numpy(dtype=float)[0].tolist()
    metrics = json.loads((folder / "metrics.json").read_text())
    return acc[names].to_numpy(dtype=float), names, zeroshot, metrics


def summarise(out: Path, methods: list[str], order: int, seeds: list[int]) -> dict:
    """Per method: Transfer/Last/BWT/mean-diagonal per seed, the per-domain diagonal (seed mean), names."""
    rows = {}
    for method in methods:
        done = [s for s in seeds if (out / f"synthetic-order{order}" / method / f"seed{s}" / "metrics.json").is_file()]
        if not done:
            continue
        per_seed = [load(out, method, order, s) for s in done]
        names = per_seed[0][1]
        rows[method] = {
            "seeds": done,
            "transfer": [m["transfer"] for *_, m in per_seed],
            "last": [m["last"] for *_, m in per_seed],
            "bwt": [m["bwt"] for *_, m in per_seed],
            "diag_mean": [float(np.mean(np.diag(a))) for a, *_ in per_seed],
            "diag": np.mean([np.diag(a) for a, *_ in per_seed], axis=0).tolist(),
            "zeroshot_row": np.mean([z for _, _, z, _ in per_seed], axis=0).tolist(),
            "names": names,
        }
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def pooled(a: list[float], b: list[float]) -> float:
    return float(np.sqrt((mean_std(a)[1] ** 2 + mean_std(b)[1] ** 2) / 2))


def chance_levels(order: int) -> dict[str, float]:
    from clbench.datasets.synthetic import DOMAINS, ORDERS

    return {name: 100.0 / len(DOMAINS[name][0]) for name in ORDERS[order]}


def check_order(rows: dict, order: int) -> list[Check]:
    checks: list[Check] = []
    chance = chance_levels(order)
    for method in ("finetune", "lora"):
        if method in rows:
            r = rows[method]
            diag_mean = mean_std(r["diag_mean"])[0]
            worst = min(r["diag"])
            checks.append(Check(1, order, f"{method}: mean diagonal {diag_mean:.1f} >= 85", diag_mean >= 85))
            checks.append(Check(1, order, f"{method}: lowest domain diagonal {worst:.1f} >= 60", worst >= 60))
    if "zeroshot" in rows:
        z = rows["zeroshot"]
        zt = mean_std(z["transfer"])[0]
        checks.append(Check(2, order, f"zero-shot Transfer {zt:.1f} >= 45", zt >= 45))
        top = max(chance.values())
        checks.append(Check(2, order, f"highest chance level {top:.1f} <= 20", top <= 20))
        names = z["names"]
        later = names[len(names) // 3 + (1 if len(names) % 3 else 0):]
        known = [n for n in later if z["zeroshot_row"][names.index(n)] >= 2 * chance[n]]
        checks.append(Check(2, order, f"partly known zero-shot after the first third: {len(known)}/{len(later)} "
                            f"({', '.join(known)}) >= half", 2 * len(known) >= len(later)))
        for method in ("finetune", "lora"):
            if method in rows:
                t = mean_std(rows[method]["transfer"])[0]
                b = mean_std(rows[method]["bwt"])[0]
                checks.append(Check(3, order, f"{method}: Transfer {t:.1f} <= zero-shot {zt:.1f} - 6", t <= zt - 6))
                checks.append(Check(3, order, f"{method}: BWT {b:.1f} <= -8", b <= -8))

    def margin(item: int, label: str, lhs: list[float], rhs: list[float], offset: float) -> None:
        lm, rm = mean_std(lhs)[0], mean_std(rhs)[0]
        gap, spread = lm - (rm + offset), pooled(lhs, rhs)
        enough = min(len(lhs), len(rhs)) >= 2  # with one seed the std, and so the check, is undefined
        note = "" if enough else " (undecided: needs 2+ seeds per row)"
        checks.append(Check(item, order, f"{label}: {lm:.1f} vs {rm:.1f}{offset:+.0f}, margin {gap:+.1f} > pooled "
                            f"std {spread:.1f}{note}", enough and gap > spread))

    if {"keeplora", "zeroshot"} <= rows.keys():
        margin(4, "KeepLoRA Transfer >= zero-shot - 2", rows["keeplora"]["transfer"], rows["zeroshot"]["transfer"], -2)
    if {"keeplora", "lora"} <= rows.keys():
        margin(4, "KeepLoRA Transfer >= LoRA + 4", rows["keeplora"]["transfer"], rows["lora"]["transfer"], 4)
        margin(4, "KeepLoRA Last >= LoRA Last + 5", rows["keeplora"]["last"], rows["lora"]["last"], 5)
    if {"zscl", "zeroshot"} <= rows.keys():
        margin(4, "ZSCL Transfer >= zero-shot - 3", rows["zscl"]["transfer"], rows["zeroshot"]["transfer"], -3)
    return checks


def read_claims(rows: dict, order: int) -> list[Check]:
    """Each paper's MTIL claim (:data:`CLAIMS`) on this order, with its margin; item 5, never a gate."""
    out = []
    for label, method, metric, reference, offset in CLAIMS:
        if {method, reference} <= rows.keys():
            lhs, rhs = rows[method][metric], rows[reference][metric]
            gap = mean_std(lhs)[0] - (mean_std(rhs)[0] + offset)
            out.append(Check(5, order, f"{label}: {mean_std(lhs)[0]:.1f} vs {mean_std(rhs)[0]:.1f}{offset:+.0f}, "
                             f"margin {gap:+.1f} (pooled std {pooled(lhs, rhs):.1f})", gap > 0))
    return out


def table(rows: dict, order: int, seeds: list[int]) -> str:
    names = next(iter(rows.values()))["names"]
    lines = [f"Order {order} (seeds {', '.join(map(str, seeds))} where finished; mean ± std)", "",
             "| method | seeds | Transfer | Last | BWT | mean A[t,t] |", "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in (mean_std(r[k]) for k in ("transfer", "last", "bwt", "diag_mean"))]
        lines.append(f"| {method} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "| per domain | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
              "| chance | " + " | ".join(f"{chance_levels(order)[n]:.0f}" for n in names) + " |"]
    if "zeroshot" in rows:
        lines.append("| zero-shot | " + " | ".join(f"{v:.0f}" for v in rows["zeroshot"]["zeroshot_row"]) + " |")
    for method in rows:
        if method != "zeroshot":
            lines.append(f"| {method} A[t,t] | " + " | ".join(f"{v:.0f}" for v in rows[method]["diag"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--orders", default="1,2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--out", type=Path, default=Path("results-embedded"))
    parser.add_argument("--markdown", type=Path, help="also write the tables and checks to this file")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: summarise the finished runs found in --out (each row says how many seeds)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    orders = [int(o) for o in args.orders.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        run_all(methods, orders, seeds, args.out, args.preset)
    report, failed = [], 0
    for order in orders:
        rows = summarise(args.out, methods, order, seeds)
        report += [table(rows, order, seeds), ""]
        for c in check_order(rows, order):
            report.append(f"- [{'x' if c.ok else ' '}] item {c.item}: {c.text}")
            failed += not c.ok
        report += ["", "Claims of the baselines' papers (readings, not gates):"]
        report += [f"- [{'x' if c.ok else ' '}] {c.text}" for c in read_claims(rows, order)]
        report.append("")
    text = "\n".join(report)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
