"""The benchmark machinery, for real but small: in-process measurements on the quick models, the results writer,
the /metrics arithmetic against a real Prometheus endpoint, the py-spy summary, and the load generator against
a real server. No timed assertions: only that the figures exist, are consistent and are written."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import inprocess, load, profiling, report, suite
from bench.data import BUILTIN_PROMPTS, BUILTIN_SENTENCES, Texts, load_texts
from bench.machine import machine_info, machine_slug
from bench.stats import latency_summary, ratio_of_rounds

TEXTS = Texts(sentences=list(BUILTIN_SENTENCES), prompts=list(BUILTIN_PROMPTS), source="built-in")


def test_texts_fall_back_to_the_built_in_set_and_refuse_a_missing_folder(tmp_path: Path) -> None:
    texts = load_texts(tmp_path, count=10)  # an empty folder: no SST-2, no tiny-shakespeare
    assert texts.sentences and texts.prompts
    assert set(texts.sentences) <= set(BUILTIN_SENTENCES)
    assert "built-in" in texts.source
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_texts(tmp_path / "missing")


def test_ratio_of_rounds_is_the_median_of_per_round_ratios() -> None:
    figures = ratio_of_rounds([10.0, 30.0, 20.0], [10.0, 10.0, 10.0])
    assert figures["rounds"] == [1.0, 3.0, 2.0]
    assert figures["ratio"] == 2.0
    assert figures["pooled"] == 2.0
    summary = latency_summary([0.001, 0.002, 0.003])
    assert summary["count"] == 3 and summary["p50"] == pytest.approx(2.0)


def test_in_process_measurements_and_the_results_writer(quick_repo: Path, tmp_path: Path) -> None:
    classifier = inprocess.ModelFiles.find(quick_repo, "sentiment")
    loop = inprocess.Classifier(classifier, threads=1)
    probabilities = loop(TEXTS.sentences[:3])
    assert probabilities.shape == (3, len(classifier.config["labels"]))
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)

    ctx = suite.Context(plan=suite.QUICK, texts=TEXTS, threads=1, work=tmp_path / "work")
    rounds = [
        suite.alternating(r, [
            ("batch1", lambda: inprocess.measure_classifier(loop, TEXTS.sentences, 1, 0.05)),
            ("batch4", lambda: inprocess.measure_classifier(loop, TEXTS.sentences, 4, 0.05)),
        ])
        for r in range(2)
    ]
    entry = suite.compare(
        ctx, id="test/batch4-vs-batch1", group="test", model="sentiment", title="batch 4 / batch 1",
        metric="sequences/s", a="batch 4", b="batch 1",
        a_values=[r["batch4"]["sequences_per_s"] for r in rounds],
        b_values=[r["batch1"]["sequences_per_s"] for r in rounds], target=0.0,
    )
    per_round = [r["batch4"]["sequences_per_s"] / r["batch1"]["sequences_per_s"] for r in rounds]
    assert entry["ratio"] == pytest.approx(statistics.median(per_round), rel=1e-3)
    assert entry["met"] is True

    decoder = inprocess.Decoder(inprocess.ModelFiles.find(quick_repo, "docgpt"), threads=1)
    decode = inprocess.measure_decoder(decoder, TEXTS.prompts, batch_size=2, max_new_tokens=3, duration_s=0.0)
    assert decode["runs"] >= 1 and decode["tokens_per_s"] > 0
    assert decode["ttft_ms"]["count"] == decode["runs"]

    info = machine_info()
    results = {
        "created": "2026-01-01T00:00:00+00:00",
        "machine": info,
        "machine_slug": machine_slug(info),
        "plan": suite.plan_dict(suite.QUICK),
        "notes": ["test"],
        "baselines": {"sentiment": {"model": classifier.summary(),
                                    "inprocess_batches": [r["batch1"] for r in rounds]}},
        "comparisons": ctx.comparisons,
        "generation": {"docgpt": {
            "model": decoder.model.summary(), "max_new_tokens": 3,
            "summary": {"inprocess": {"2": decode}},
        }},
    }
    paths = report.write_results(results, tmp_path / "out", "test-run")
    written = json.loads(paths["json"].read_text())
    assert written["comparisons"][0]["ratio"] == entry["ratio"]
    assert written["baselines"]["sentiment"]["inprocess_batches"][0]["sequences_per_s"] > 0
    text = paths["md"].read_text()
    assert "batch 4 / batch 1" in text and "sentiment" in text and "docgpt" in text
    assert paths["generate-tokens"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "generate-latency" not in paths  # no server side measured: no latency plot
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_histogram_mean_from_a_real_metrics_endpoint() -> None:
    from prometheus_client import CollectorRegistry, Histogram, start_http_server

    registry = CollectorRegistry()
    sizes = Histogram("nlpserve_batch_size", "sequences per batch", ["model", "method"], registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        sizes.labels("sentiment", "Classify").observe(2)
        before = load.scrape(url)
        for size in (4, 8):
            sizes.labels("sentiment", "Classify").observe(size)
        sizes.labels("other", "Classify").observe(100)
        after = load.scrape(url)
    finally:
        server.shutdown()
        thread.join()
    assert load.histogram_mean(before, after, "nlpserve_batch_size", model="sentiment", method="Classify") == 6.0
    assert load.histogram_mean(after, after, "nlpserve_batch_size", model="sentiment") is None


def test_profile_summary_separates_onnxruntime_from_the_rest() -> None:
    ort = "run (onnxruntime/capi/onnxruntime_inference_collection.py:250)"
    raw = "\n".join([
        f"main (server/app.py:10);step (server/batching.py:40);{ort} 60",
        "main (server/app.py:10);step (server/batching.py:40);pad (server/classify.py:70) 30",
        "main (server/app.py:10);_poll (/usr/lib/python3.11/asyncio/base_events.py:1) 10",
        "run (asyncio/runners.py:1);EpollSelector.select (/usr/lib/python3.11/selectors.py:468) 20",
    ])
    summary = profiling.summarize(raw)
    assert summary["samples"] == 120
    assert summary["onnxruntime_percent"] == 50.0
    assert summary["waiting_percent"] == round(100 * 20 / 120, 1)
    assert summary["outside_onnxruntime_percent"] == round(100 * 40 / 120, 1)
    assert summary["top_self"][0] == {"name": "pad (server/classify.py)", "percent": 25.0}
    assert {"name": "asyncio", "percent": round(100 * 10 / 120, 1)} in summary["by_package"]
    assert {"name": "main (server/app.py)", "percent": round(100 * 40 / 120, 1)} in summary["top_total"]
    assert all("select" not in e["name"] for e in summary["top_self"])  # waiting is not a cost


def test_load_generator_against_a_real_server(quick_repo: Path, tmp_path: Path) -> None:
    from server.process import ServerProcess

    # The window stays open until three requests completed in it (at most one per client straddles its start,
    # so one of them was sent inside it: a first token and a batch inside it), however slow the machine; the
    # bound only stops a hung server.
    window = load.Window(warmup_s=0.2, duration_s=0.5, min_requests=3, max_duration_s=120.0)
    ctx = suite.Context(plan=suite.QUICK, texts=TEXTS, threads=1, work=tmp_path)
    repo = suite.single_model_repository(quick_repo, "sentiment", tmp_path)
    (repo / "docgpt").symlink_to((quick_repo / "docgpt").resolve(), target_is_directory=True)
    try:
        with ServerProcess(repo, args=ctx.server_args()) as srv:
            requests = load.classify_requests("sentiment", TEXTS.sentences)
            point = ctx.run(load.classify_closed_loop(srv.target, requests, 2, window, srv.metrics_url))
            assert point["requests"] >= 3 and point["codes"] == {"OK": point["requests"]}
            assert point["latency_ms"]["count"] == point["requests"]
            assert point["mean_batch_size"] is not None and 1 <= point["mean_batch_size"] <= 2

            opened = ctx.run(load.classify_open_loop(srv.target, requests, 20.0, window, srv.metrics_url))
            assert opened["codes"].get("OK", 0) >= 1 and opened["dropped"] == 0

            prompts = [load.generate_request("docgpt", p, 4) for p in TEXTS.prompts]
            gen = ctx.run(load.generate_closed_loop(srv.target, prompts, 2, window, srv.metrics_url))
            assert gen["requests"] >= 3 and gen["codes"].get("OK") == gen["requests"]
            assert gen["tokens_per_s"] > 0 and gen["ttft_ms"]["count"] >= 1
            assert gen["mean_batch_size"] is not None and gen["mean_batch_size"] >= 1
    finally:
        ctx.runner.close()


def test_cli_refuses_a_missing_data_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    assert main(["all", "--quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"bench: error: --data {tmp_path / 'missing'}: no such folder"
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_llm_comparison_plumbing(llm_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Llama-family comparison on the tiny shared-buffer decoder (its int4 variant: onnxruntime-genai gets a
    rewritten genai_config.json), the real server through the project's client and onnxruntime-genai's loop, the
    ratios and the results writer; a missing model is a skip, not a failure."""
    from bench import llm
    from bench.__main__ import main

    # Windows open until three streams ended in them (one of them sent inside: a first token inside), not of a
    # fixed length: on a loaded machine none might end in a fraction of a second. The bound stops a hang only.
    plan = llm.LlmPlan(
        name="test", rounds=1, variants=("int4",), streams=(1, 2), max_new_tokens=4, arrival_s=0.2,
        single_window=load.Window(warmup_s=0.1, duration_s=0.3, min_requests=3, max_duration_s=120.0),
        batch_window=load.Window(warmup_s=0.3, duration_s=0.5, min_requests=3, max_duration_s=120.0),
        profile_seconds=0.0,
    )
    model = llm.find_model(llm_repo, "tinyllama")
    prompts = llm.chat_prompts(model, 2)
    assert len(prompts.conversations) == len(prompts.token_ids) >= 2
    assert {len(ids) for ids in prompts.token_ids} == {prompts.length}  # a static batch needs one length

    folder = inprocess.genai_folder(model, "int4", 1, tmp_path / "work")
    genai_config = json.loads((folder / "genai_config.json").read_text())
    assert genai_config["model"]["decoder"]["filename"] == "model.int4.onnx"
    assert (folder / "model.int4.onnx").resolve() == (model.folder / "model.int4.onnx").resolve()

    ctx = suite.Context(plan=suite.QUICK, texts=TEXTS, threads=1, work=tmp_path / "work")
    try:
        result = llm.bench_llm(ctx, plan, llm_repo, "tinyllama")
    finally:
        ctx.runner.close()
    assert set(result["variants"]) == {"int4"}
    for variant in result["variants"].values():
        for side in ("server", "genai"):
            for streams in ("1", "2"):
                point = variant["summary"][side][streams]
                assert point["tokens_per_s"] > 0 and point["ttft_ms"]["count"] >= 1
        assert variant["summary"]["server"]["2"]["codes"].get("OK", 0) >= 1
        assert variant["summary"]["genai"]["2"]["batch_size"] == 2
    ids = {c["id"] for c in ctx.comparisons}
    assert "llm/tinyllama/int4/server-vs-genai/s2/tokens" in ids and len(ids) == 4

    info = machine_info()
    results = {"created": "2026-01-01T00:00:00+00:00", "machine": info, "machine_slug": machine_slug(info),
               "plan": {"name": "test", "rounds": 1}, "comparisons": ctx.comparisons, "llm": {"tinyllama": result}}
    paths = report.write_results(results, tmp_path / "out", "test-llm")
    text = paths["md"].read_text()
    assert "onnxruntime-genai, batch 2" in text and "int4 (model.int4.onnx" in text
    assert paths["llm-tokens"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(llm.ModelAbsent, match="no model 'tinyllama'"):
        llm.find_model(tmp_path, "tinyllama")
    assert main(["llm", "--models", str(tmp_path / "empty"), "--out", str(tmp_path / "skipped")]) == 0
    assert capsys.readouterr().err.strip().startswith("bench: llm skipped: no model 'smollm2'")
    assert not (tmp_path / "skipped").exists()


def test_hostile_scenario_pure_functions(tmp_path: Path) -> None:
    """The hostile-input scenario's requests, windows, memory figures, comparisons and report, on made-up
    records (no server, no timing)."""
    from bench import hostile

    assert len(hostile.filler(1000)) == 1000 and hostile.filler(50).isascii()
    lim = hostile.Limits(classifier="sentiment", generator="docgpt", classify_cut_chars=128 * 128,
                         prompt_max_chars=128 * 17, classify_max_sequence_length=128, generator_context=128,
                         longest_token_chars=17)
    specs = hostile.hostile_specs(lim)
    assert set(specs) == set(hostile.KINDS)
    for spec in specs.values():
        size = len(hostile.build_request(spec).SerializeToString())
        assert hostile.HOSTILE_CHARS * 0.95 < size < hostile.MAX_MESSAGE_BYTES or spec.kind == "generate-cut"
    cut = hostile.build_request(specs["classify-cut"])
    assert len(cut.texts) == 237 and {len(t) for t in cut.texts} == {128 * 128}
    assert len(hostile.build_request(specs["generate-cut"]).prompt) == 128 * 17

    status = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert hostile.parse_status_kb(status, "VmRSS") == 102400 and hostile.parse_status_kb(status, "VmSwap") is None
    assert hostile.rss_kb(os.getpid()) > 0
    samples = [(0.0, 100 * 1024), (1.0, 300 * 1024), (2.0, 150 * 1024), (3.0, 120 * 1024)]
    assert hostile.rss_between(samples, 0.5, 2.5) == {"at_start": 100.0, "peak": 300.0, "least": 150.0,
                                                      "at_end": 150.0}

    # victims: two methods, a quiet window [0, 10) and a hostile one [10, 20); counted by when they were sent
    records = [("Classify", float(t), t + 0.010, "OK") for t in range(10)]
    records += [("Classify", 10.0 + t, 10.0 + t + 0.100, "OK") for t in range(10)]
    records += [("ListModels", 0.5, 0.502, "OK"), ("ListModels", 11.0, 11.004, "OK"), ("ListModels", 12.0, 12.5,
                                                                                         "UNAVAILABLE")]
    quiet, loud = hostile.victims_in(records, 0.0, 10.0), hostile.victims_in(records, 10.0, 20.0)
    assert quiet["Classify"]["latency_ms"]["count"] == 10
    assert quiet["Classify"]["latency_ms"]["p99"] == pytest.approx(10.0)
    assert loud["ListModels"]["codes"] == {"OK": 1, "UNAVAILABLE": 1}
    assert loud["ListModels"]["latency_ms"]["count"] == 1  # failures are not latencies
    phase = {"name": "classify-max", "quiet": {"victims": quiet}, "hostile": {"victims": loud}}
    ratios = hostile.phase_ratios(phase)
    assert ratios["Classify"] == {"p50": 10.0, "p99": 10.0} and ratios["ListModels"]["p99"] == 2.0
    assert hostile.ratio(1.0, None) is None and hostile.ratio(1.0, 0.0) is None

    burst = [["classify-max", 10.0, 10.2, "OK"], ["classify-max", 10.2, 10.3, "OK"],
             ["generate-max", 10.0, 10.01, "INVALID_ARGUMENT"]]
    summary = hostile.hostile_summary(burst, specs)
    assert summary["classify-max"]["requests"] == 2 and summary["generate-max"]["codes"] == {"INVALID_ARGUMENT": 1}
    assert summary["generate-max"]["latency_ms"]["count"] == 1  # a refusal's latency counts too
    plot = hostile.series(samples, records, 0.0)
    assert plot["rss_mb"][1] == [1.0, 300.0] and max(v for _, v in plot["victim_max_ms"]) == pytest.approx(500.0)

    side = {"label": "current", "commit": "abc1234", "startup_s": 1.0, "duration_s": 20.0,
            "rss_mb": {"before_first_hostile": 100.0, "peak": 300.0, "at_end": 120.0},
            "series": {**plot, "hostile_windows": [["classify-max", 10.0, 20.0]]},
            "phases": [{**phase, "kinds": ["classify-max"], "ratios": ratios, "hostile_requests": summary,
                        "hostile": {**phase["hostile"], "seconds": 10.0, "server_cpu_percent": 90.0},
                        "quiet": {**phase["quiet"], "load_average": 1.0}, "recovery": {"seconds": 5.0},
                        "rss_mb": {"before": 100.0, "peak": 300.0, "after": 150.0}}]}
    result = {"limits": asdict(lim), "specs": {k: asdict(s) for k, s in specs.items()}, "sides": {"current": side}}
    entries = hostile.comparisons(result)
    assert {e["id"] for e in entries} == {"hostile/current/classify-max/Classify/p99",
                                          "hostile/current/classify-max/ListModels/p99"}
    assert entries[0]["ratio"] == 10.0 and entries[0]["higher_is_better"] is False

    info = machine_info()
    paths = report.write_results({"created": "2026-01-01T00:00:00+00:00", "machine": info,
                                  "machine_slug": machine_slug(info), "plan": {"name": "test", "rounds": 1},
                                  "comparisons": entries, "hostile": result}, tmp_path, "test-hostile")
    text = paths["md"].read_text()
    assert "## Hostile input" in text and "| classify-max | 100 | 300 | 150 | 50.0 |" in text
    assert paths["hostile"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hostile_cli_refuses_a_bad_server_env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    assert main(["hostile", "--server-env", "NOEQUALS", "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().endswith("--server-env 'NOEQUALS': expected KEY=VALUE")
    assert not (tmp_path / "out").exists()


def test_embed_comparison_plumbing(quick_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sentence-embedding comparison on the quick demo embedder: the real servers (fp32 and opt) over gRPC,
    sentence-transformers' encode and the in-process ONNX Runtime loop on the same texts, the same vectors on
    every side, the comparisons, the results writer and `report`; the CLI refuses a GPU run in one line."""
    from bench import embed
    from bench.__main__ import main, write_results

    plan = embed.EmbedPlan(name="test", texts=len(TEXTS.sentences), rounds=1, concurrency=(1, 2),
                           batch_concurrency=(1,), batch_texts=4, inprocess_batch=4, slices=2)
    result = embed.bench_embed(quick_repo, TEXTS.sentences, plan, threads=1, variants=("fp32", "opt"),
                               work=tmp_path / "work")
    assert result["variants"] == ["fp32", "opt"] and result["variants_missing"] == []
    assert set(result["sweep"]) == {f"server/{v}/{s}" for v in ("fp32", "opt") for s in ("c1x1", "c2x1", "c1x4")}
    for point in result["rounds"][0]["sweep"].values():
        assert point["codes"] == {"OK": point["requests"]} and point["texts"] == len(TEXTS.sentences)
        assert point["latency_ms"]["count"] == point["requests"] and point["mean_batch_size"] >= 1
    final = result["rounds"][0]["final"]
    assert set(final) == {"sentence-transformers", "inprocess/fp32", "inprocess/opt", "best/fp32/1", "best/fp32/4",
                          "best/opt/1", "best/opt/4"}
    assert all(p["texts"] == len(TEXTS.sentences) and p["texts_per_s"] > 0 for p in final.values())
    assert all(len(p["slices_texts_per_s"]) == 2 for p in final.values())
    # the same computation on every side (the quick twin of sentence-transformers: same shape, same seed)
    assert all(cosine > 0.999 for k, cosine in result["agreement_least_cosine"].items()
               if not k.startswith("sentence-transformers"))
    ids = {c["id"] for c in result["comparisons"]}
    assert "embed/fp32/server-x1-vs-inprocess" in ids and "embed/opt/server-best-vs-sentence-transformers" in ids
    assert len(ids) == 7

    info = machine_info()
    results = {"created": "2026-01-01T00:00:00+00:00", "machine": info, "machine_slug": machine_slug(info),
               "plan": asdict(plan), "comparisons": result.pop("comparisons"), "embed": result}
    paths = write_results(results, tmp_path / "out", "test-embed")
    text = paths["md"].read_text()
    assert "## Sentence embeddings: minilm-embed" in text and "in-process ORT opt, length-sorted" in text
    assert "## Comparisons" in text and "sentence-transformers encode, batch_size 4" in text
    paths["md"].unlink()
    assert main(["report", str(paths["json"])]) == 0  # the tables come back from the JSON
    assert "## Sentence embeddings" in paths["md"].read_text()
    assert "embed: fp32: in-process ORT" in capsys.readouterr().out

    assert main(["embed", "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 1
    assert capsys.readouterr().err.strip().endswith("embed: CPU only (sentence-transformers runs on PyTorch's CPU "
                                                    "build here)")
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("fixture, model", [("llm_repo", "tinyllama"), ("quick_repo", "docgpt")])
def test_openai_front_comparison_plumbing(fixture: str, model: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    """The OpenAI front against nlpserve.v1 on one real server: a tiny Llama with a chat template (chat on both
    fronts) and the quick docgpt without one (completions); both fronts complete every request with the same
    number of tokens (greedy), the comparison is recorded, the Markdown has the table, `report` rewrites it."""
    from bench import openai_front
    from bench.__main__ import main, write_results

    repository = request.getfixturevalue(fixture)
    plan = openai_front.FrontsPlan(name="test", rounds=2, streams=2, requests=4, max_tokens=4, aiperf_requests=0)
    result = openai_front.bench_fronts(repository, model, plan, threads=1, variant="fp32", work=tmp_path / "w")
    assert ("no chat template" in result["prompts"]) == (model == "docgpt")
    assert len(result["rounds"]) == 2 and result["same_token_counts"]
    for entry in result["rounds"]:
        for label in ("nlpserve.v1", "openai"):
            point = entry[label]
            # 4 requests of at most 4 tokens (fewer when the model ends a sequence), the same on both fronts
            assert point["ok"] == 4 and point["errors"] == [] and 4 <= point["tokens"] <= 16, (label, point)
            assert point["ttft_ms"]["count"] == 4
    (comparison,) = result["comparisons"]
    assert comparison["id"] == "openai/openai-vs-nlpserve" and comparison["target"] == 0.9
    assert len(comparison["a_values"]) == len(comparison["b_values"]) == 2

    info = machine_info()
    results = {"created": "2026-01-01T00:00:00+00:00", "machine": info, "machine_slug": machine_slug(info),
               "plan": asdict(plan), "comparisons": result.pop("comparisons"), "openai": result}
    paths = write_results(results, tmp_path / "out", "test-openai")
    assert f"## OpenAI front against nlpserve.v1: {model} fp32" in paths["md"].read_text()
    paths["md"].unlink()
    assert main(["report", str(paths["json"])]) == 0
    assert "## OpenAI front against nlpserve.v1" in paths["md"].read_text()
    assert "openai: openai " in capsys.readouterr().out


def test_triton_comparison_parts(quick_repo: Path, tmp_path: Path) -> None:
    """The perf_analyzer side of the Triton comparison against the real server (PyTriton's venv is made only by
    the benchmark itself: a few hundred MB): one point's figures from perf_analyzer's CSV, and the choice of the
    best point under a p99 bound."""
    from bench import triton
    from server.process import ServerProcess

    binary = triton.check_perf_analyzer()
    plan = triton.TritonPlan(name="test", rounds=1, concurrency=(1, 2), window_ms=300)
    data = tmp_path / "texts.json"
    data.write_text(json.dumps({"data": [{"text": [t]} for t in TEXTS.sentences[:8]]}))
    single = suite.single_model_repository(quick_repo, "sentiment", tmp_path)
    with ServerProcess(single, args=["--http-port", "-1", "--log-level", "WARNING"]) as srv:
        points = {c: triton.perf_analyzer_point(binary, srv.target, "sentiment", data, c, plan, tmp_path)
                  for c in plan.concurrency}
    for c, point in points.items():
        assert point["concurrency"] == c and point["infer_per_s"] > 0
        assert 0 < point["p50_ms"] <= point["p99_ms"], point
        assert point["server_compute_ms"] > 0  # from the server's ModelStatistics
    assert not list(tmp_path.glob("pa-*.csv"))  # each run's CSV read and removed

    fake = {1: {"infer_per_s": 10.0, "p99_ms": 5.0, "concurrency": 1},
            4: {"infer_per_s": 30.0, "p99_ms": 20.0, "concurrency": 4},
            8: {"infer_per_s": 31.0, "p99_ms": 90.0, "concurrency": 8}}
    assert triton.best_under(fake, None)["concurrency"] == 8
    assert triton.best_under(fake, 20.0)["concurrency"] == 4
    assert triton.best_under(fake, 1.0) is None


def test_long_prompt_comparison_plumbing(llm_repo: Path, quick_repo: Path, tmp_path: Path) -> None:
    """The long-prompt comparison on a tiny Llama: real servers with chunked prefill and without, streams and a
    long-prompt client at once, the comparisons, the results writer; a concatenating decoder is refused. The
    window stays open until 2 streams completed in it (at most 60 s), so a busy machine only makes it longer."""
    from bench import load as bench_load
    from bench import long_prompt
    from bench.__main__ import write_results

    plan = long_prompt.LongPromptPlan(name="test", rounds=1, streams=2, max_new_tokens=4, long_tokens=48,
                                      long_new_tokens=1, window=bench_load.Window(0.2, 1.5, 2, 60.0), chunk_tokens=(8,))
    result = long_prompt.bench_long_prompts(llm_repo, "tinyllama", plan, threads=1, variant="fp32", work=tmp_path)
    (entry,) = result["rounds"]
    assert set(entry) == {"chunk 8", "whole"}
    for point in entry.values():
        assert point["streams"]["codes"].get("OK", 0) > 0 and point["streams"]["itl_ms"]["count"] > 0
        assert point["long_prompts"]["count"] > 0  # long prompts were answered during the window
    ids = {c["id"] for c in result["comparisons"]}
    assert ids == {"longprompt/chunk8/itl-p99", "longprompt/chunk8/itl-max", "longprompt/chunk8/tokens",
                   "longprompt/chunk8/long-ttft"}
    assert len(long_prompt.long_prompts(inprocess.ModelFiles.find(llm_repo, "tinyllama"), 48)) == 4

    info = machine_info()
    results = {"created": "2026-01-01T00:00:00+00:00", "machine": info, "machine_slug": machine_slug(info),
               "plan": asdict(plan), "comparisons": result.pop("comparisons"), "longprompt": result}
    paths = write_results(results, tmp_path / "out", "test-longprompt")
    assert "## Long prompts: tinyllama fp32, 48-token prompts, chunks of 8" in paths["md"].read_text()

    with pytest.raises(ValueError, match="shared-buffer decoder"):  # the quick docgpt concatenates its cache
        long_prompt.bench_long_prompts(quick_repo, "docgpt", plan, 1, "fp32", tmp_path / "concat")
