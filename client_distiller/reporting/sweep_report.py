"""What a protection sweep reports: `runs.csv` (one row per run), `summary.md` and `ood_vs_units.png`.

Kept apart from the runner so the tables can be rebuilt from a `runs.csv` alone (the runner calls
:func:`write_report` after every invocation, including one that had nothing left to run).

Numbers are grouped per (mode, budget) over seeds: mean ± standard error (sample standard
deviation / sqrt(n); no ± with a single seed). "Budget to 90%": the smallest budget at which a
mode's mean OOD accuracy reaches 90% of the unprotected (`none`) mean OOD accuracy at the largest
budget `none` ran with; "not reached" when no budget of the sweep gets there.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

from client_distiller.reporting.tables import mean_se

RUN_FIELDS = ("mode", "budget", "seed", "method", "units_spent", "units_new", "images_bought", "images_wanted",
              "prompts", "embedding_dim", "id_acc", "ood_acc", "fidelity", "fidelity_dims", "watermark_p_value",
              "watermark_detected", "b4b_coverage", "b4b_noise", "train_seconds", "run_seconds", "run_dir")
UNPROTECTED = "none"
TARGET_FRACTION = 0.9


def read_runs(path: Path) -> list[dict[str, Any]]:
    """Rows of `runs.csv` with numbers parsed (empty cells -> None)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def append_run(path: Path, row: Mapping[str, Any]) -> None:
    """Append one run (header first when the file is new); flushed before returning, so a killed
    sweep keeps every finished run."""
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in RUN_FIELDS})
        f.flush()


def _parse(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def _pct(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m, se = mean_se([100.0 * v for v in values])
    return f"{m:.1f}" if len(values) < 2 else f"{m:.1f} ± {se:.1f}"


def _num(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "n/a"
    m, se = mean_se(values)
    return fmt.format(m) if len(values) < 2 else f"{fmt.format(m)} ± {fmt.format(se)}"


def _watermark(rows: Sequence[Mapping[str, Any]]) -> str:
    """Detections over seeds (the vendor's own verdict), then each seed's p-value: a mean of
    p-values would hide that one key's watermark is detected and another's is not (each seed's
    key has its own secret target)."""
    tested = [r for r in rows if isinstance(r.get("watermark_p_value"), (int, float))]
    if not tested:
        return "n/a"
    detected = sum(str(r.get("watermark_detected")).lower() == "true" for r in tested)
    p_values = ", ".join(f"{float(r['watermark_p_value']):.2g}" for r in tested)
    return f"{detected}/{len(tested)} (p {p_values})"


def _mean(values: Sequence[float]) -> str:
    return f"{sum(values) / len(values):.0f}" if values else "-"


def _values(rows: Sequence[Mapping[str, Any]], field: str) -> list[float]:
    return [float(r[field]) for r in rows if isinstance(r.get(field), (int, float)) and not isinstance(r[field], bool)]


def grouped(rows: Sequence[Mapping[str, Any]], modes: Sequence[str] | None = None
            ) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """(mode, budget) -> rows, modes in the sweep's order (then any others), budgets ascending."""
    order = list(dict.fromkeys([*(modes or []), *(str(r["mode"]) for r in rows)]))
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for mode in order:
        for budget in sorted({int(r["budget"]) for r in rows if str(r["mode"]) == mode}):
            groups[(mode, budget)] = [r for r in rows if str(r["mode"]) == mode and int(r["budget"]) == budget]
    return groups


def budget_to_target(rows: Sequence[Mapping[str, Any]], modes: Sequence[str] | None = None
                     ) -> tuple[float | None, dict[str, str]]:
    """The unprotected reference OOD accuracy (90% of `none` at its largest budget) and, per mode,
    the smallest budget whose mean OOD accuracy reaches it."""
    groups = grouped(rows, modes)
    clean = [b for (m, b) in groups if m == UNPROTECTED]
    if not clean:
        return None, {}
    reference = mean_se(_values(groups[(UNPROTECTED, max(clean))], "ood_acc"))[0]
    target = TARGET_FRACTION * reference
    reached = {mode: "not reached" for mode, _ in groups}
    for (mode, budget), members in groups.items():  # budgets ascending: the first one that reaches it
        ood = _values(members, "ood_acc")
        if reached[mode] == "not reached" and ood and mean_se(ood)[0] >= target - 1e-12:
            units = _values(members, "units_spent")
            reached[mode] = f"{budget} ({mean_se(units)[0]:.0f} units spent)" if units else str(budget)
    return target, reached


def summary_markdown(rows: Sequence[Mapping[str, Any]], *, modes: Sequence[str] | None = None,
                     header: Mapping[str, Any] | None = None) -> str:
    """The sweep's tables: accuracy, fidelity, cost and mode-specific measurements per (mode, budget)."""
    lines = ["# Protection sweep: what each vendor protection mode costs a distilling client", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    if header:
        lines.append("")
    lines += ["OOD = held-out test domain, ID = source domains' held-out split; accuracy in %, mean ± standard "
              "error over seeds. Fidelity = mean cosine between the student's projected embeddings and the "
              "clean (`none`) teacher's on the test-domain images (compared on the first d dimensions, each "
              "renormalised: for `truncate` that is the clean teacher truncated; for `rotate` a low value is the "
              "defence working; n/a for students without a teacher-space projection, e.g. KD). Units spent = "
              "what the key paid for the targets of that run (from the run's ledger; mean over seeds, as are images "
              "bought). Watermark p-value: the vendor's own test (`vendor-admin verify-watermark`) on the "
              "student's projected embeddings of the held-out test-domain images: students detected at the "
              "vendor's threshold (p < 0.01) out of seeds, and each seed's p-value. B4B coverage and noise: the key's state after the run, from "
              "`/v1/usage`.", ""]
    head = ["Mode", "Method", "Budget", "Units spent", "Images bought", "OOD acc", "ID acc", "Fidelity",
            "Watermark detected (p per seed)", "B4B coverage", "B4B noise", "Seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (mode, budget), members in grouped(rows, modes).items():
        methods = ", ".join(sorted({str(r["method"]) for r in members}))
        lines.append("| " + " | ".join([
            f"`{mode}`", methods, str(budget), _mean(_values(members, "units_spent")),
            _mean(_values(members, "images_bought")), _pct(_values(members, "ood_acc")),
            _pct(_values(members, "id_acc")), _num(_values(members, "fidelity")),
            _watermark(members), _num(_values(members, "b4b_coverage")),
            _num(_values(members, "b4b_noise")), str(len(members))]) + " |")
    lines += ["", "![OOD accuracy against units spent, one line per mode](ood_vs_units.png)"]
    target, reached = budget_to_target(rows, modes)
    lines += ["", f"## Budget needed to reach {TARGET_FRACTION:.0%} of the unprotected OOD accuracy", ""]
    if target is None:
        lines.append("n/a: the sweep has no unprotected (`none`) runs to compare with.")
    else:
        lines += [f"Target: {100 * target:.1f}% OOD ({TARGET_FRACTION:.0%} of `none` at its largest budget).", "",
                  "| Mode | Smallest budget reaching it |", "|---|---|"]
        lines += [f"| `{mode}` | {value} |" for mode, value in reached.items()]
    return "\n".join(lines) + "\n"


def plot_ood_vs_units(rows: Sequence[Mapping[str, Any]], out_png: Path, *, modes: Sequence[str] | None = None) -> Path:
    """OOD accuracy (mean ± s.e. over seeds) against units spent, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = grouped(rows, modes)
    for mode in dict.fromkeys(m for m, _ in groups):
        xs, ys, es = [], [], []
        for (m, _budget), members in groups.items():
            ood, units = _values(members, "ood_acc"), _values(members, "units_spent")
            if m != mode or not ood or not units:
                continue
            xs.append(mean_se(units)[0])
            mean, se = mean_se([100 * v for v in ood])
            ys.append(mean)
            es.append(se)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=mode)
    target, _ = budget_to_target(rows, modes)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label=f"{TARGET_FRACTION:.0%} of none")
    ax.set_xlabel("units spent on training targets")
    ax.set_ylabel("student OOD accuracy (%)")
    ax.set_title("What protection costs a distilling client")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(runs_csv: Path, out_dir: Path, *, modes: Sequence[str] | None = None,
                 header: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Rebuild `summary.md` and `ood_vs_units.png` from `runs.csv`."""
    rows = read_runs(runs_csv)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(rows, modes=modes, header=header))
    return {"summary": summary, "plot": plot_ood_vs_units(rows, out_dir / "ood_vs_units.png", modes=modes)}
