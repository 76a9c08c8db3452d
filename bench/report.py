"""Text summary of a sweep: chunkmem-vs-peer ratios, the linear-cost table (use_global=False
against use_global=True and SDPA causal), chunkmem beside FlexAttention, the model rows."""
from __future__ import annotations

__all__ = ["primary_impl", "ratio_table", "linear_cost_table", "flex_table", "model_table",
           "status_table", "report"]

LINEAR_COST_T = (2048, 4096, 8192, 16384)


def primary_impl(records) -> str:
    """The chunkmem implementation "auto" picks on the sweep's device."""
    return "chunkmem-triton" if any(r["impl"] == "chunkmem-triton" for r in records) else "chunkmem-torch"


def _index(records):
    return {(r["op"], r["impl"], r["pass"], r["T"]): r for r in records}


def _ok(r):
    return r is not None and r["status"] == "ok"


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def ratio_table(records) -> str:
    """Time and memory of chunk+memory over SDPA causal and over the three-path op, at the
    largest T where all three are ok (per pass)."""
    idx, impl = _index(records), primary_impl(records)
    lines = [f"### chunk+memory ({impl}) vs peers at the largest common T", "",
             "| pass | T | time / SDPA causal | memory / SDPA causal | time / three-path | memory / three-path |",
             "|---|---|---|---|---|---|"]
    for pass_ in [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in records)]:
        common = [T for (op, im, p, T), r in idx.items()
                  if (op, im, p) == ("chunk+memory", impl, pass_) and _ok(r)
                  and _ok(idx.get(("causal", "sdpa", pass_, T)))
                  and _ok(idx.get(("global+chunk+memory", impl, pass_, T)))]
        if not common:
            lines.append(f"| {pass_} | no common T | | | | |")
            continue
        T = max(common)
        cm, sd, g3 = (idx[(op, im, pass_, T)] for op, im in
                      (("chunk+memory", impl), ("causal", "sdpa"), ("global+chunk+memory", impl)))

        def ratio(a, b, key):
            return _fmt(a[key] / b[key], ".3f") if a[key] and b[key] else "-"
        lines.append(f"| {pass_} | {T} | {ratio(cm, sd, 'median_ms')} | {ratio(cm, sd, 'peak_mem_mb')} | "
                     f"{ratio(cm, g3, 'median_ms')} | {ratio(cm, g3, 'peak_mem_mb')} |")
    return "\n".join(lines)


def _shape(records) -> str:
    r = next((r for r in records if r["op"] != "model"), None)
    if r is None:
        return ""
    return f"B={r['B']}, H={r['H']}, D={r['D']}, chunk {r['chunk_size']}, S={r['S']}"


def linear_cost_table(records) -> str:
    """chunkmem-torch (use_global False / True) beside SDPA causal at the T of 2k..16k that ran, and two
    checks of linear cost: memory(16k)/memory(4k) <= 4.5 and time(SDPA)/time at 16k >= 5
    (use_global=False)."""
    idx = _index(records)
    cols = (("chunk+memory", "chunkmem-torch", "torch use_global=False"),
            ("global+chunk+memory", "chunkmem-torch", "torch use_global=True"),
            ("causal", "sdpa", "SDPA causal"))
    head = " | ".join(f"{name} ms | {name} MiB" for _, _, name in cols)
    lines = ["### linear cost without the global path: torch backend (use_global False / True) vs "
             f"SDPA causal ({_shape(records)})", "",
             f"| pass | T | {head} |", "|---|---|" + "---|" * (2 * len(cols))]
    n_rows = 0
    for pass_ in ("fwd", "fwd+bwd"):
        for T in LINEAR_COST_T:
            if not any((op, impl, pass_, T) in idx for op, impl, _ in cols):
                continue
            n_rows += 1
            cells = []
            for op, impl, _ in cols:
                r = idx.get((op, impl, pass_, T))
                if _ok(r):
                    cells += [_fmt(r["median_ms"]), _fmt(r["peak_mem_mb"])]
                else:
                    cells += [r["status"] if r else "not run", ""]
            lines.append(f"| {pass_} | {T} | " + " | ".join(cells) + " |")
    if not n_rows:
        return ""
    lines.append("")
    for pass_ in ("fwd", "fwd+bwd"):
        m4, m16 = (idx.get(("chunk+memory", "chunkmem-torch", pass_, T)) for T in (4096, 16384))
        sdpa16 = idx.get(("causal", "sdpa", pass_, 16384))
        if _ok(m4) and _ok(m16) and m4["peak_mem_mb"] > 0:
            mr = m16["peak_mem_mb"] / m4["peak_mem_mb"]
            lines.append(f"- {pass_}: use_global=False memory(16k)/memory(4k) = {mr:.2f} "
                         f"(linear: <= 4.5; {'met' if mr <= 4.5 else 'MISSED'})")
        if _ok(m16) and _ok(sdpa16):
            tr = sdpa16["median_ms"] / m16["median_ms"]
            lines.append(f"- {pass_}: SDPA causal time / use_global=False time at 16k = {tr:.1f}x "
                         f"(target >= 5: {'met' if tr >= 5 else 'MISSED'})")
    return "\n".join(lines)


def flex_table(records) -> str:
    """chunkmem beside FlexAttention (compiled, block mask of the same pattern), op by op, at every
    T where both ran: op chunk is the same function on both; op chunk+memory is a cost peer
    (FlexAttention: one softmax over memory slots and chunk keys together)."""
    idx, impl = _index(records), primary_impl(records)
    rows = []
    for op in ("chunk", "chunk+memory"):
        for pass_ in ("fwd", "fwd+bwd"):
            Ts = sorted(T for (o, im, p, T), r in idx.items() if (o, im, p) == (op, "flex", pass_) and _ok(r))
            for T in Ts:
                fx, cm = idx[(op, "flex", pass_, T)], idx.get((op, impl, pass_, T))
                if not _ok(cm):
                    continue
                rows.append(f"| {op} | {pass_} | {T} | {_fmt(cm['median_ms'])} | {_fmt(cm['peak_mem_mb'])} | "
                            f"{_fmt(fx['median_ms'])} | {_fmt(fx['peak_mem_mb'])} | "
                            f"{_fmt(cm['median_ms'] / fx['median_ms'], '.2f')} |")
    if not rows:
        return ""
    return "\n".join([
        f"### {impl} vs FlexAttention (compiled flex_attention, block mask of the same pattern)", "",
        "op chunk: the same function (causal inside chunks of chunk_size keys); op chunk+memory: "
        "FlexAttention takes one softmax over the memory slots and the chunk's keys together "
        "(same pairs, a cost peer).", "",
        f"| op | pass | T | {impl} ms | {impl} MiB | flex ms | flex MiB | time {impl} / flex |",
        "|---|---|---|---|---|---|---|---|", *rows])


def model_table(records) -> str:
    """Whole-model forward+backward tokens/s and peak memory."""
    rows = [r for r in records if r["op"] == "model"]
    if not rows:
        return ""
    lines = ["### whole model, forward+backward (next-token loss)", "",
             "| impl | T | d_model | layers | segment_len | params | median ms | tokens/s | peak MiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['T']} | {r.get('d_model', '-')} | {r.get('n_layers', '-')} | "
                     f"{r.get('segment_len') or '-'} | {r.get('params', '-')} | {_fmt(r['median_ms'])} | "
                     f"{_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['peak_mem_mb'])} | {r['status']} |")
    return "\n".join(lines)


def status_table(records) -> str:
    """The first point of each series that is not ok, with its status."""
    first = {}
    for r in records:
        if r["status"] != "ok":
            first.setdefault((r["impl"], r["op"], r["pass"]), r)
    if not first:
        return ""
    lines = ["### series with points that are not ok (first such point)", "",
             "| impl | op | pass | T | status |", "|---|---|---|---|---|"]
    for (impl, op, pass_), r in first.items():
        lines.append(f"| {impl} | {op} | {pass_} | {r['T']} | {r['status']} |")
    return "\n".join(lines)


def report(records, header: str = "") -> str:
    """All tables of a sweep as Markdown."""
    parts = [header, ratio_table(records), linear_cost_table(records), flex_table(records),
             model_table(records), status_table(records)]
    return "\n\n".join(p for p in parts if p) + "\n"


def header_of(meta: dict, n_records: int) -> str:
    """The report's header from a results.json meta: sweep, command, machine, date, wall time, load."""
    from bench.common import describe_machine
    from bench.plots import sweep_title

    def load(avg):
        return "/".join(f"{x:.1f}" for x in avg) if avg else "?"
    title = sweep_title(meta.get("device", ""), meta.get("dtype", ""), meta.get("config", {}))
    machine = describe_machine(meta["machine"]) if meta.get("machine") else (
        f"{meta.get('device')}, Python {meta.get('python')}, torch {meta.get('torch')}")
    return (f"## bench results: {title}\n\n`{meta.get('command')}` on {machine}; {meta.get('threads')} "
            f"threads, {meta.get('date_utc')}.\n\n{n_records} points, wall time {meta.get('wall_s', 0):.0f} s; "
            f"load average (1/5/15 min) before {load(meta.get('loadavg_1_5_15_before'))}, after "
            f"{load(meta.get('loadavg_1_5_15_after'))} (other processes on the machine inflate CPU times)")


def main(argv=None) -> int:
    """``python -m bench.report <results.json>``: rewrite report.md next to a results.json (the
    tables from its records, e.g. after the report's layout changed) and print it."""
    import sys
    from pathlib import Path

    from bench.common import read_results

    argv = sys.argv[1:] if argv is None else argv
    meta, records = read_results(argv[0])
    text = report(records, header_of(meta, len(records)))
    Path(argv[0]).with_name("report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
