#!/usr/bin/env python3
"""Copy selected metric columns out of a run's generated report.md into two tables
(mean ± interval, and difference to the baseline), for docs/research-example.md.

It computes nothing: every cell is the report's own text, so the doc's numbers are the
report's. Usage: tools/report_tables.py RUN_DIR/report.md
"""
import sys

# (report metric name, short column title)
COLUMNS = [
    ("train.l0", "train L0"),
    ("train.fvu", "train FVU"),
    ("core.reconstruction_quality.explained_variance", "EV (SAEBench)"),
    ("core.model_performance_preservation.ce_loss_score", "CE score"),
    ("core.model_behavior_preservation.kl_div_score", "KL score"),
    ("absorption_first_letter.mean.mean_absorption_fraction_score", "absorption frac."),
    ("absorption_first_letter.mean.mean_full_absorption_score", "full absorption"),
    ("sparse_probing.sae.sae_top_1_test_accuracy", "SAE top-1 probe acc."),
    ("tpp.tpp_metrics.tpp_threshold_20_total_metric", "TPP N=20"),
    ("scr.scr_metrics.scr_metric_threshold_20", "SCR N=20"),
]


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(path):
    """metric -> variant -> (value cell, delta cell), in the order variants appear."""
    table, order = {}, []
    header = None
    for line in open(path, encoding="utf-8"):
        if not line.startswith("|"):
            header = None
            continue
        c = cells(line)
        if c[0] == "variant":
            header = c
            continue
        if header is None or set(line.strip()) <= set("|-"):
            continue
        variant = c[0]
        if variant not in order:
            order.append(variant)
        # Metric columns come in (value, "Δ vs baseline") pairs.
        for i in range(1, len(header) - 1):
            if not header[i].startswith("Δ") and header[i + 1].startswith("Δ"):
                table.setdefault(header[i], {})[variant] = (c[i], c[i + 1])
    return table, order


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    table, order = parse(sys.argv[1])
    cols = [(m, t) for m, t in COLUMNS if m in table]
    missing = [m for m, _ in COLUMNS if m not in table]
    if missing:
        print(f"(not in the report: {', '.join(missing)})\n", file=sys.stderr)
    head = "| variant | " + " | ".join(t for _, t in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    for k, title in [(0, "Mean ± 95% interval over seeds:"), (1, "Difference to the baseline (± 95% interval, as the report computes it):")]:
        print(title + "\n\n" + head + "\n" + rule)
        for v in order:
            row = [table[m].get(v, ("—", "—"))[k] for m, _ in cols]
            print(f"| {v} | " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main()
