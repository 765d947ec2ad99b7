"""The results writer: every raw figure as JSON, a Markdown table, and PNG plots, side by side in one folder:
`<stem>.json`, `<stem>.md`, `<stem>-*.png` (the stem is `<date>-<machine>`)."""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_results(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Writes the JSON, the Markdown and the plots; returns their paths by kind ("json", "md", plot names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots = write_plots(results, out_dir, stem)
    results = {**results, "plots": {k: p.name for k, p in plots.items()}}
    paths["json"] = _write_atomic(out_dir / f"{stem}.json", json.dumps(results, indent=1, sort_keys=False) + "\n")
    paths["md"] = _write_atomic(out_dir / f"{stem}.md", markdown(results))
    paths |= plots
    return paths


def _write_atomic(path: Path, text: str) -> Path:
    """No half-written result file, even when the run is interrupted while writing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ Markdown


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return lines + [""]


def machine_line(machine: dict[str, Any]) -> str:
    libs = machine.get("libraries", {})
    gpu = ", ".join(g["name"] for g in machine.get("gpus", [])) or "no GPU"
    versions = ", ".join(f"{k} {libs[k]}" for k in ("onnxruntime-gpu", "onnxruntime", "torch", "transformers",
                                                     "grpcio", "tokenizers") if k in libs)
    return (f"{machine.get('cpu_model')}, {machine.get('cpus_usable')} CPUs, {machine.get('memory_gib')} GiB, {gpu}; "
            f"Python {machine.get('python')}, {versions}")


def comparison_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for c in results.get("comparisons", []):
        target = "-"
        if c.get("target") is not None:
            target = ("≥ " if c["higher_is_better"] else "≤ ") + f"{c['target']:g}"
        met = {True: "yes", False: "**no**", None: "-"}[c.get("met")]
        rows.append([c["title"], c["model"], c["metric"], c["a_median"], c["b_median"],
                     f"**{c['ratio']:.2f}**" if c.get("ratio") is not None else "-",
                     ", ".join(f"{r:.2f}" for r in c.get("rounds", [])), target, met])
    return rows


def markdown(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    lines = [f"# nlpserve benchmarks: {results.get('created', '')[:10]}, {results.get('machine_slug', '')}", ""]
    lines += [f"- Machine: {machine_line(machine)}.",
              (f"- Commit {machine.get('git_commit')}; plan `{results.get('plan', {}).get('name')}` "
              f"({results.get('plan', {}).get('rounds')} rounds); `{results.get('command', '')}`."),
              f"- Server settings: {results.get('settings', {})}.",
              f"- Texts: {results.get('texts', '')}.",
              (f"- Load average (1 min) at start {_f(machine.get('load_average_at_start', [None])[0], 2)}, "
              f"at end {_f(results.get('load_average_at_end'), 2)}.")]
    lines += [f"- {note}" for note in results.get("notes", [])]
    lines.append("")
    if results.get("comparisons"):
        lines += ["## Comparisons", "",
                  ("Each ratio is a/b, the median of the per-round ratios; both sides ran in the same run, in "
                  "alternating order. For latency (p50 ms) lower is better."), ""]
        lines += _table(["comparison", "model", "metric", "a", "b", "ratio", "per round", "target", "met"],
                        comparison_rows(results))
    for name, c in results.get("classification", {}).items():
        lines += _classification_md(name, c)
    for name, g in results.get("generation", {}).items():
        lines += _generation_md(name, g)
    for name, b in results.get("baselines", {}).items():
        lines += _baselines_md(name, b)
    for name, m in results.get("llm", {}).items():
        lines += _llm_md(name, m)
    if results.get("profiles"):
        lines += _profiles_md(results["profiles"])
    if results.get("hostile"):
        lines += _hostile_md(results["hostile"])
    for kind, file in results.get("plots", {}).items():
        lines += [f"![{kind}]({file})", ""]
    return "\n".join(lines)


def headline(results: dict[str, Any], stem: str, link_prefix: str = "") -> str:
    """The part of the results a README shows: the machine, the notes, the comparisons, the plots (links
    prefixed with `link_prefix`, the way from the README's folder to the results folder)."""
    machine = results.get("machine", {})
    minutes = results.get("elapsed_s", 0) / 60
    lines = [
        (f"Latest results: `{results.get('machine_slug')}`, {results.get('created', '')[:10]} (commit "
         f"{machine.get('git_commit')}, {minutes:.0f} minutes); every figure is in [{stem}.json]"
         f"({link_prefix}{stem}.json), every table in [{stem}.md]({link_prefix}{stem}.md)."),
        "",
        f"- Machine: {machine_line(machine)}.",
    ]
    lines += [f"- {note}" for note in results.get("notes", [])]
    lines += ["", ("Each ratio is a/b, the median of the per-round ratios (both sides in the same run, "
                   "alternating); for latency (p50 ms) lower is better."), ""]
    lines += _table(["comparison", "model", "metric", "a", "b", "ratio", "per round", "target", "met"],
                    comparison_rows(results))
    for kind, file in results.get("plots", {}).items():
        lines += [f"![{kind}]({link_prefix}{file})", ""]
    return "\n".join(lines)


def _model_line(model: dict[str, Any]) -> str:
    return (f"{model.get('model_type')}, {model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
            f"{model.get('fp32_megabytes')} MB fp32")


def _classification_md(name: str, c: dict[str, Any]) -> list[str]:
    lines = [f"## Classification: {name} ({_model_line(c['model'])})", "", "In-process ONNX Runtime loop:", ""]
    lines += _table(["batch size", "sequences/s", "batch p50 ms"],
                    [[p["batch_size"], p["sequences_per_s"], p["batch_latency_ms"]["p50"]]
                     for p in c.get("inprocess_batches", [])])
    lines += [("Server (adaptive batching), closed loop, medians of the rounds; CPU: share of one CPU used by the "
              "server and by the load generator during the window:"), ""]
    lines += _table(["concurrency", "sequences/s", "p50 ms", "p90 ms", "p99 ms", "mean batch", "server CPU %",
                     "client CPU %"],
                    [[p["concurrency"], p["sequences_per_s"], p["latency_ms"]["p50"], p["latency_ms"]["p90"],
                      p["latency_ms"]["p99"], p["mean_batch_size"], p.get("server_cpu_percent"),
                      p.get("client_cpu_percent")]
                     for p in c.get("server_sweep", [])])
    if c.get("configs_summary"):
        lines += ["Batching configurations (medians of the rounds):", ""]
        rows = []
        for label, points in c["configs_summary"].items():
            for conc, p in points.items():
                rows.append([label, conc, p["sequences_per_s"], p["latency_ms"]["p50"], p["latency_ms"]["p99"],
                             p["mean_batch_size"]])
        lines += _table(["config", "concurrency", "sequences/s", "p50 ms", "p99 ms", "mean batch"], rows)
    if c.get("open_loop"):
        lines += ["Open loop (constant rate; latency counted from when each request was due):", ""]
        lines += _table(["offered/s", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "mean batch", "dropped", "codes"],
                        [[p["rate"], p["sequences_per_s"], p["latency_ms"]["p50"], p["latency_ms"]["p90"],
                          p["latency_ms"]["p99"], p["mean_batch_size"], p["dropped"], _codes(p["codes"])]
                         for p in c["open_loop"]])
    return lines


def _generation_md(name: str, g: dict[str, Any]) -> list[str]:
    lines = [f"## Generation: {name} ({_model_line(g['model'])}), {g.get('max_new_tokens')} new tokens, greedy", "",
             ("Medians of the rounds. TTFT: time to first token as the client sees it (server p50: the server's own "
              "figure; they differ when the server holds tokens back until their text is complete UTF-8); ITL: "
              "inter-token latency."), ""]
    rows = []
    for label, points in g.get("summary", {}).items():
        for streams, p in points.items():
            if label == "inprocess":
                rows.append([streams, "in-process decode loop", p["tokens_per_s"], p["ttft_ms"]["p50"],
                             p["ttft_ms"]["p99"], "-", "-", "-", p["per_stream_tokens_per_s"], streams,
                             p["max_new_tokens"]])
            else:
                rows.append([streams, {"continuous": "server, continuous batching",
                                       "single": "server, max_active_sequences=1",
                                       "sampled": "server, continuous batching, sampled"}[label],
                             p["tokens_per_s"], p["ttft_ms"]["p50"], p["ttft_ms"]["p99"],
                             p.get("server_ttft_ms", {}).get("p50"), p["itl_ms"]["p50"], p["itl_ms"]["p99"],
                             p["per_stream_tokens_per_s"], p["mean_batch_size"], p.get("mean_generated_tokens")])
    rows.sort(key=lambda row: int(row[0]))
    lines += _table(["streams", "side", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "server TTFT p50 ms",
                     "ITL p50 ms", "ITL p99 ms", "per-stream tokens/s", "mean batch", "tokens/stream"], rows)
    if g.get("torch_no_cache"):
        t = g["torch_no_cache"]
        lines += [(f"PyTorch without KV cache, one request at a time: {_f(t['tokens_per_s'])} tokens/s, "
                  f"TTFT p50 {_f(t['ttft_ms']['p50'])} ms."), ""]
    return lines


def _llm_md(name: str, m: dict[str, Any]) -> list[str]:
    model = m["model"]
    lines = [(f"## Llama-family decoder: {name} ({model.get('model_type')}, {model.get('num_layers')} layers, hidden "
              f"{model.get('hidden_size')}), server against onnxruntime-genai, {m.get('max_new_tokens')} new tokens, "
              "greedy"), "",
             (f"Prompts: {m['prompts']['source']}. Medians of the rounds. Server: 1 stream, or N streams starting at "
              "random times within the first second, closed loop for a fixed window (tokens that arrived in it; "
              "TTFT as the client sees it). onnxruntime-genai: its generator loop at batch 1 or a static batch "
              "of N (generated tokens over the runs' wall time, prefill included; TTFT: the batch's first token). "
              "CPU: share of one CPU used by the server and by the load generator."), ""]
    rows = []
    for variant, v in m.get("variants", {}).items():
        for side, points in v.get("summary", {}).items():
            for streams, p in points.items():
                server = side == "server"
                rows.append([f"{variant} ({v['file']}, {_f(v['megabytes'])} MB)", streams,
                             f"server, {streams} streams" if server else f"onnxruntime-genai, batch {streams}",
                             p["tokens_per_s"], p["ttft_ms"]["p50"], p["ttft_ms"]["p99"],
                             p.get("server_ttft_ms", {}).get("p50") if server else "-",
                             p["itl_ms"]["p50"] if server else "-", p["per_stream_tokens_per_s"],
                             p.get("mean_generated_tokens"), p.get("mean_batch_size") if server else int(streams),
                             p.get("server_cpu_percent") if server else "-",
                             p.get("client_cpu_percent") if server else "-"])
    rows.sort(key=lambda row: (row[0], int(row[1])))
    lines += _table(["variant", "streams", "side", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "server TTFT p50 ms",
                     "ITL p50 ms", "per-stream tokens/s", "tokens/request", "mean batch", "server CPU %",
                     "client CPU %"], rows)
    return lines


def _baselines_md(name: str, b: dict[str, Any]) -> list[str]:
    lines = [f"## In-process baselines: {name} ({_model_line(b['model'])})", ""]
    if "inprocess_batches" in b:
        lines += _table(["batch size", "sequences/s", "batch p50 ms"],
                        [[p["batch_size"], p["sequences_per_s"], p["batch_latency_ms"]["p50"]]
                         for p in b["inprocess_batches"]])
    if "inprocess_decode" in b:
        lines += _table(["batch size", "tokens/s", "per-stream tokens/s", "TTFT p50 ms"],
                        [[p["batch_size"], p["tokens_per_s"], p["per_stream_tokens_per_s"], p["ttft_ms"]["p50"]]
                         for p in b["inprocess_decode"]])
    if "torch_no_cache" in b:
        t = b["torch_no_cache"]
        lines += [f"PyTorch without KV cache: {_f(t['tokens_per_s'])} tokens/s, TTFT p50 {_f(t['ttft_ms']['p50'])} ms.",
                  ""]
    return lines


def _profiles_md(profiles: dict[str, Any]) -> list[str]:
    lines = ["## Where the server spends its time (py-spy, under load)", ""]
    for kind, p in profiles.items():
        if "error" in p:
            lines += [f"{kind}: not profiled ({p['error']}).", ""]
            continue
        label = kind if p["model"] in kind else f"{kind} on {p['model']}"  # older results: keyed by kind alone
        lines += [(f"**{label}**: {p['samples']} samples, {_f(p['onnxruntime_percent'])}% inside "
                  f"ONNX Runtime, {_f(p.get('waiting_percent'))}% waiting (select, idle workers), "
                  f"{_f(p['outside_onnxruntime_percent'])}% working outside ONNX Runtime. Top costs outside ONNX "
                  "Runtime (self time: C code counts to the Python function that called it; % of all samples):"), ""]
        lines += _table(["function (where)", "%"], [[e["name"], e["percent"]] for e in p["top_self"][:10]])
        lines += _table(["package", "%"], [[e["name"], e["percent"]] for e in p["by_package"][:8]])
    return lines


def _hostile_md(h: dict[str, Any]) -> list[str]:
    lim = h.get("limits", {})
    lines = ["## Hostile input", "",
             (f"Models: classifier `{lim.get('classifier')}` (texts cut to {lim.get('classify_cut_chars'):,} characters "
              f"= max_sequence_length {lim.get('classify_max_sequence_length')} x 128 by the current server), generator "
              f"`{lim.get('generator')}` (prompts over {lim.get('prompt_max_chars'):,} characters = context "
              f"{lim.get('generator_context')} x its longest vocabulary entry, {lim.get('longest_token_chars')} "
              "characters, refused by the current server before tokenizing). Hostile requests:"), ""]
    lines += _table(["kind", "RPC", "texts", "characters each", "MB"],
                    [[k, s["method"], s["texts"], f"{s['chars']:,}", round(s["texts"] * s["chars"] / 1e6, 2)]
                     for k, s in h.get("specs", {}).items()])
    for side in h.get("sides", {}).values():
        rss = side.get("rss_mb", {})
        lines += [(f"### {side['label']}: commit {side.get('commit')}"
                   f"{' with uncommitted server changes' if side.get('uncommitted_server_changes') else ''}"), "",
                  (f"Server ready in {_f(side.get('startup_s'))} s; RSS {_f(rss.get('before_first_hostile'))} MB before "
                   f"the first hostile window, peak {_f(rss.get('peak'))} MB, {_f(rss.get('at_end'))} MB at the end "
                   f"({_f(side.get('duration_s'))} s of phases)."), ""]
        rows = []
        for p in side["phases"]:
            for method, quiet in p["quiet"]["victims"].items():
                hostile = p["hostile"]["victims"].get(method, {"latency_ms": {}, "codes": {}})
                ratios = p.get("ratios", {}).get(method, {})
                rows.append([p["name"], method, quiet["latency_ms"]["count"], quiet["latency_ms"]["p50"],
                             quiet["latency_ms"]["p99"], hostile["latency_ms"].get("count"),
                             hostile["latency_ms"].get("p50"), hostile["latency_ms"].get("p99"),
                             hostile["latency_ms"].get("max"), ratios.get("p50"),
                             f"**{ratios['p99']:.2f}**" if ratios.get("p99") is not None else "-",
                             _codes(hostile["codes"])])
        lines += ["Victims (calls sent in each window; quiet, then hostile):", ""]
        lines += _table(["phase", "victim RPC", "quiet n", "quiet p50 ms", "quiet p99 ms", "hostile n",
                         "hostile p50 ms", "hostile p99 ms", "hostile max ms", "p50 ratio", "p99 ratio",
                         "hostile codes"], rows)
        rows = []
        for p in side["phases"]:
            for kind, r in p["hostile_requests"].items():
                rows.append([p["name"], kind, r["requests"], _codes(r["codes"]), r["latency_ms"]["p50"],
                             r["latency_ms"]["max"], p["hostile"]["seconds"], p["hostile"]["server_cpu_percent"]])
        lines += ["Hostile requests (the window lasts until the last one sent came back):", ""]
        lines += _table(["phase", "kind", "sent", "codes", "p50 ms", "max ms", "window s", "server CPU %"], rows)
        lines += ["Server RSS, MB (before: just before the hostile window; after: at the end of the recovery):", ""]
        lines += _table(["phase", "before", "peak", "after", "after - before", "recovery s", "load average"],
                        [[p["name"], p["rss_mb"]["before"], p["rss_mb"]["peak"], p["rss_mb"]["after"],
                          round(p["rss_mb"]["after"] - p["rss_mb"]["before"], 1)
                          if p["rss_mb"]["after"] is not None and p["rss_mb"]["before"] is not None else None,
                          p["recovery"]["seconds"], p["quiet"]["load_average"]] for p in side["phases"]])
    return lines


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) or "-"


# --------------------------------------------------------------------------------------------------- plots


def _log2_x(ax: Any, values: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())


def write_plots(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Throughput against concurrency, latency percentiles, tokens/s against streams, TTFT/ITL against streams."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server, and none needed
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    subtitle = f"{results.get('machine_slug', '')}, {results.get('created', '')[:10]}"
    classification = {k: v for k, v in results.get("classification", {}).items() if v.get("server_sweep")}
    generation = {k: v for k, v in results.get("generation", {}).items() if v.get("summary")}

    def save(fig: Any, kind: str) -> None:
        path = out_dir / f"{stem}-{kind}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths[kind] = path

    if classification:
        fig, axes = plt.subplots(1, len(classification), figsize=(5.5 * len(classification), 4), squeeze=False)
        for ax, (name, c) in zip(axes[0], classification.items()):
            sweep = c["server_sweep"]
            ax.plot([p["concurrency"] for p in sweep], [p["sequences_per_s"] for p in sweep], "o-",
                    label="server, adaptive batching")
            for label, marker in (("batch1", "s"), ("fixed", "^")):
                points = c.get("configs_summary", {}).get(label)
                if points:
                    ax.plot([int(k) for k in points], [p["sequences_per_s"] for p in points.values()], marker,
                            label={"batch1": "server, max_batch_size=1", "fixed": "server, fixed delay"}[label])
            limit = [r["inprocess"]["sequences_per_s"] for r in c.get("rounds", [])]
            if limit:
                ax.axhline(statistics.median(limit), color="grey", ls="--",
                           label=f"in-process ORT, batch {c['inprocess_best_batch_size']}")
            _log2_x(ax, [p["concurrency"] for p in sweep])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("sequences/s")
            ax.set_ylim(bottom=0)
            ax.set_title(f"classification: {name}")
            ax.legend(fontsize=8)
        fig.suptitle(subtitle, fontsize=9)
        save(fig, "classify-throughput")

        fig, axes = plt.subplots(1, len(classification), figsize=(5.5 * len(classification), 4), squeeze=False)
        for ax, (name, c) in zip(axes[0], classification.items()):
            sweep = c["server_sweep"]
            for q in ("p50", "p90", "p99"):
                ax.plot([p["concurrency"] for p in sweep], [p["latency_ms"][q] for p in sweep], "o-", label=q)
            _log2_x(ax, [p["concurrency"] for p in sweep])
            ax.set_yscale("log")
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("latency, ms")
            ax.set_title(f"classification latency: {name}")
            ax.legend(fontsize=8)
        fig.suptitle(subtitle, fontsize=9)
        save(fig, "classify-latency")

    if generation:
        fig, axes = plt.subplots(1, len(generation), figsize=(5.5 * len(generation), 4), squeeze=False)
        for ax, (name, g) in zip(axes[0], generation.items()):
            for label, text in (("continuous", "server, continuous batching"),
                                ("single", "server, max_active_sequences=1"),
                                ("inprocess", "in-process ORT decode loop (batch = streams)")):
                points = g["summary"].get(label, {})
                if not points:
                    continue
                ax.plot([int(k) for k in points], [p["tokens_per_s"] for p in points.values()], "o-", label=text)
            if g.get("torch_no_cache"):
                ax.axhline(g["torch_no_cache"]["tokens_per_s"], color="grey", ls="--",
                           label="PyTorch, no KV cache, one at a time")
            _log2_x(ax, [int(k) for k in g["summary"].get("continuous", {})])
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel("generated tokens/s (all streams)")
            ax.set_ylim(bottom=0)
            ax.set_title(f"generation: {name}")
            ax.legend(fontsize=8)
        fig.suptitle(subtitle, fontsize=9)
        save(fig, "generate-tokens")

    llm = {k: m for k, m in results.get("llm", {}).items() if m.get("variants")}
    if llm:
        fig, axes = plt.subplots(1, len(llm), figsize=(6.5 * len(llm), 4), squeeze=False)
        for ax, (name, m) in zip(axes[0], llm.items()):
            groups = [(variant, streams) for variant, v in m["variants"].items() for streams in v["summary"]["server"]]
            xs = range(len(groups))
            for offset, side, text in ((-0.2, "server", "server (gRPC, AsyncClient)"),
                                       (0.2, "genai", "onnxruntime-genai loop (static batch)")):
                ax.bar([x + offset for x in xs], [m["variants"][v]["summary"][side][s]["tokens_per_s"] for v, s in groups],
                       width=0.4, label=text)
            ax.set_xticks(list(xs), [f"{v}\n{s} stream{'s' if s != '1' else ''}" for v, s in groups])
            ax.set_ylabel("generated tokens/s (all streams)")
            ax.set_title(f"Llama-family decoder: {name}")
            ax.legend(fontsize=8)
        fig.suptitle(subtitle, fontsize=9)
        save(fig, "llm-tokens")

    sides = results.get("hostile", {}).get("sides", {})
    if sides:
        fig, axes = plt.subplots(2, len(sides), figsize=(6.5 * len(sides), 6), squeeze=False, sharex="col")
        for column, side in enumerate(sides.values()):
            s = side["series"]
            top, bottom = axes[0][column], axes[1][column]
            if s["rss_mb"]:
                top.plot([p[0] for p in s["rss_mb"]], [p[1] for p in s["rss_mb"]], color="tab:red")
            if s["victim_max_ms"]:
                bottom.plot([p[0] for p in s["victim_max_ms"]], [p[1] for p in s["victim_max_ms"]], ".",
                            markersize=3)
            for ax in (top, bottom):
                for name, start, end in s["hostile_windows"]:
                    ax.axvspan(start, end, color="grey", alpha=0.15)
            for k, (name, start, _end) in enumerate(s["hostile_windows"]):
                top.annotate(name, (start, 0.98 - 0.07 * (k % 2)), xycoords=("data", "axes fraction"), fontsize=7,
                             va="top")
            top.set_ylabel("server RSS, MB")
            top.set_title(f"hostile input: {side['label']}")
            bottom.set_yscale("log")
            bottom.set_ylabel("slowest victim call per 0.25 s, ms")
            bottom.set_xlabel("seconds (grey: hostile windows)")
        fig.suptitle(subtitle, fontsize=9)
        save(fig, "hostile")

    served = {k: g for k, g in generation.items() if g["summary"].get("continuous")}
    if served:
        fig, axes = plt.subplots(1, len(served), figsize=(5.5 * len(served), 4), squeeze=False)
        for ax, (name, g) in zip(axes[0], served.items()):
            points = g["summary"]["continuous"]
            xs = [int(k) for k in points]
            for field, q in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99")):
                ax.plot(xs, [p[field][q] for p in points.values()], "o-",
                        label=f"{'TTFT' if field == 'ttft_ms' else 'ITL'} {q}")
            _log2_x(ax, xs)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel("ms")
            ax.set_title(f"generation latency (continuous batching): {name}")
            ax.legend(fontsize=8)
        fig.suptitle(subtitle, fontsize=9)
        save(fig, "generate-latency")
    return paths
