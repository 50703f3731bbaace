"""``hsam segment FOLDER|LIST OUTDIR``: cohorts, sharding over ranks, resuming, failures (``hsam.cohort``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam_testlib import ct_like_volume, make_tiny_model_file
from hsam import cohort
from hsam.cli import main

SHAPE = (4, 24, 24)  # (k, j, i)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "GROUP_RANK", "LOCAL_WORLD_SIZE", cohort.TEST_EXIT_ENV)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def run(*argv):
    return main(["segment", *[str(a) for a in argv]])


def make_cohort(folder: Path, good: int = 4, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(good):
        sitk.WriteImage(ct_like_volume(shape=SHAPE, seed=n), str(folder / f"case{n}.nii.gz"))
    if bad:
        (folder / "bad.nrrd").write_bytes(b"this is not an image" * 8)
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def record(output: Path) -> dict:
    return json.loads(cohort.record_path(output).read_text())


def by_name(rows):
    return {Path(r["input"]).name: r for r in rows}


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def hsam_command(*argv) -> list[str]:
    return [sys.executable, "-m", "hsam", "segment", *[str(a) for a in argv]]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# ------------------------------------------------------------------------------------------ one process

def test_folder_with_a_bad_volume_segments_the_others(tmp_path, tiny_model_file, capsys):
    inputs = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    assert run(inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu") == 1
    text = capsys.readouterr().out
    assert "[1/5] bad.nrrd" in text and "4 segmented, 0 already done, 1 failed" in text
    for n in range(4):
        result = sitk.ReadImage(str(out / f"case{n}.seg.nrrd"))
        assert result.GetSize() == SHAPE[::-1]
        assert record(out / f"case{n}.seg.nrrd")["output_sha256"] == cohort.sha256_file(out / f"case{n}.seg.nrrd")
    assert not (out / "bad.seg.nrrd").exists() and not cohort.record_path(out / "bad.seg.nrrd").exists()
    rows = by_name(read_csv(out / "summary.csv"))
    assert [rows[f"case{n}.nii.gz"]["status"] for n in range(4)] == ["ok"] * 4
    assert rows["bad.nrrd"]["status"] == "failed" and "cannot read" in rows["bad.nrrd"]["error"]
    assert "\n" not in rows["bad.nrrd"]["error"]
    assert {r["slices"] for n, r in rows.items() if n != "bad.nrrd"} == {"4"}
    assert read_csv(out / "summary-rank0.csv") == read_csv(out / "summary.csv")
    assert leftovers(out) == []

    # Rerun: verified outputs are skipped (not rewritten), the bad volume fails again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.seg.nrrd")}
    assert run(inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu", "--quiet") == 1
    assert "0 segmented, 4 already done, 1 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.seg.nrrd")} == stamps
    statuses = {n: r["status"] for n, r in by_name(read_csv(out / "summary.csv")).items()}
    assert statuses == {"bad.nrrd": "failed", **{f"case{n}.nii.gz": "skipped" for n in range(4)}}

    # Without the bad volume the run succeeds; --no-resume rewrites everything.
    (inputs / "bad.nrrd").unlink()
    assert run(inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu", "--quiet", "--no-resume") == 0
    assert {r["status"] for r in read_csv(out / "summary.csv")} == {"ok"}


def test_changed_input_or_model_is_redone(tmp_path, tiny_model_file):
    inputs = make_cohort(tmp_path / "in", good=3, bad=False)
    out = tmp_path / "out"
    assert run(inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu", "--quiet") == 0
    sitk.WriteImage(ct_like_volume(shape=SHAPE, seed=7), str(inputs / "case1.nii.gz"))  # new content
    os.utime(inputs / "case1.nii.gz", ns=(1, 1))
    assert run(inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu", "--quiet") == 0
    statuses = {n: r["status"] for n, r in by_name(read_csv(out / "summary.csv")).items()}
    assert statuses == {"case0.nii.gz": "skipped", "case1.nii.gz": "ok", "case2.nii.gz": "skipped"}
    other = make_tiny_model_file(tmp_path / "other.safetensors", seed=1)
    assert run(inputs, out, "--checkpoint", other, "--device", "cpu", "--quiet") == 0
    assert {r["status"] for r in read_csv(out / "summary.csv")} == {"ok"}
    # The label options are part of the record too.
    assert run(inputs, out, "--checkpoint", other, "--device", "cpu", "--quiet", "--orientation", "SPL") == 0
    assert {r["status"] for r in read_csv(out / "summary.csv")} == {"ok"}


# ---------------------------------------------------------------------------------------------- sharding

def test_two_ranks_write_each_output_exactly_once(tmp_path, tiny_model_file):
    inputs = make_cohort(tmp_path / "in", good=5, bad=True)
    out = tmp_path / "out"
    procs = [subprocess.Popen(hsam_command(inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu"),
                              env=subprocess_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, encoding="utf-8") for r in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    # rank 0 holds bad.nrrd (first in sorted order) and fails; rank 1 does not
    assert [p.returncode for p in procs] == [1, 0], logs
    assert "[rank 0/2] 3 of 6 volumes" in logs[0] and "[rank 1/2] 3 of 6 volumes" in logs[1]

    names = sorted(p.name for p in inputs.iterdir())  # bad.nrrd, case0..case4
    expected_rank = {name: i % 2 for i, name in enumerate(names)}
    for name, rank in expected_rank.items():
        output = out / (cohort._strip_image_suffix(name) + ".seg.nrrd")
        if name == "bad.nrrd":
            assert not output.exists()
            continue
        assert record(output)["rank"] == rank and record(output)["world_size"] == 2
    per_rank = [read_csv(out / f"summary-rank{r}.csv") for r in (0, 1)]
    seen = [{Path(row["input"]).name for row in rows} for rows in per_rank]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(names)
    assert all(row["rank"] == str(r) for r, rows in enumerate(per_rank) for row in rows)
    assert sum(len(rows) for rows in per_rank) == len(names)  # each input once, by one rank
    assert sorted(r["status"] for rows in per_rank for r in rows) == ["failed"] + ["ok"] * 5
    merged = read_csv(out / "summary.csv")  # the rank that finished last merged both
    assert sorted(Path(r["input"]).name for r in merged) == names
    assert leftovers(out) == []

    # --merge-summaries rebuilds summary.csv without segmenting
    (out / "summary.csv").unlink()
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert run(inputs, out, "--merge-summaries") == 1  # a failure is in it
    finally:
        del os.environ["WORLD_SIZE"]
    assert len(read_csv(out / "summary.csv")) == 6


def test_rank_assignment_is_deterministic_and_disjoint():
    items = [cohort.CohortItem(Path(f"/x/{n:02d}.nii.gz"), f"{n:02d}.seg.nrrd") for n in range(11)]
    shards = [cohort.shard(items, cohort.RankInfo(r, 3, r)) for r in range(3)]
    assert sorted((i for s in shards for i in s), key=lambda i: i.output_name) == items
    assert shards[1] == [items[1], items[4], items[7], items[10]]
    assert cohort.RankInfo.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == cohort.RankInfo(5, 8, 1)
    assert cohort.RankInfo.from_env({}) == cohort.RankInfo(0, 1, 0)
    with pytest.raises(cohort.HSAMError):
        cohort.RankInfo.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert cohort.device_for_rank("cpu", cohort.RankInfo(1, 2, 1)) == "cpu"


# ---------------------------------------------------------------------------------------- killed ranks

def test_killed_rank_resumes_and_tampered_outputs_are_redone(tmp_path, tiny_model_file, capsys):
    inputs = make_cohort(tmp_path / "in", good=4, bad=False)
    out = tmp_path / "out"
    args = (inputs, out, "--checkpoint", tiny_model_file, "--device", "cpu")
    # Killed (os._exit, as SIGKILL: no cleanup) after its 2nd volume and that volume's record.
    first = subprocess.run(hsam_command(*args), env=subprocess_env(**{cohort.TEST_EXIT_ENV: "2"}),
                           capture_output=True, text=True, encoding="utf-8", timeout=180)
    assert first.returncode == 137, first.stdout + first.stderr
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == ["case0.seg.nrrd", "case1.seg.nrrd"]
    assert not (out / "summary-rank0.csv").exists()
    assert len(read_csv(out / "summary-rank0.partial.csv")) == 2  # what it did before dying
    # Killed again, after writing the next output but before its record.
    second = subprocess.run(hsam_command(*args), env=subprocess_env(**{cohort.TEST_EXIT_ENV: "1:output"}),
                            capture_output=True, text=True, encoding="utf-8", timeout=180)
    assert second.returncode == 137, second.stdout + second.stderr
    assert "skipped" in second.stdout
    assert (out / "case2.seg.nrrd").exists() and not cohort.record_path(out / "case2.seg.nrrd").exists()
    # A temporary file a SIGKILL during a write would leave.
    (out / ".case3.seg.nrrd.0123456789ab.partial.nrrd").write_bytes(b"half")

    assert run(*args, "--quiet") == 0
    statuses = {n: r["status"] for n, r in by_name(read_csv(out / "summary.csv")).items()}
    assert statuses == {"case0.nii.gz": "skipped", "case1.nii.gz": "skipped", "case2.nii.gz": "ok",
                        "case3.nii.gz": "ok"}
    assert leftovers(out) == []
    for n in range(4):
        assert record(out / f"case{n}.seg.nrrd")["output_sha256"] == cohort.sha256_file(out / f"case{n}.seg.nrrd")

    # Tampering: a truncated output, a same-size edit, a missing output, a broken record → redone.
    good_bytes = (out / "case0.seg.nrrd").read_bytes()
    (out / "case0.seg.nrrd").write_bytes(good_bytes[: len(good_bytes) // 2])
    data = bytearray((out / "case1.seg.nrrd").read_bytes())
    data[-1] ^= 0xFF
    (out / "case1.seg.nrrd").write_bytes(bytes(data))
    (out / "case2.seg.nrrd").unlink()
    cohort.record_path(out / "case3.seg.nrrd").write_text("{not json")
    capsys.readouterr()
    assert run(*args) == 0
    text = capsys.readouterr().out
    assert "the record says" in text and "SHA-256 differs" in text and "output is missing" in text
    assert "record is unreadable" in text
    assert {r["status"] for r in read_csv(out / "summary.csv")} == {"ok"}
    assert (out / "case0.seg.nrrd").read_bytes() == good_bytes  # deterministic model: same result again
    for n in range(4):
        assert cohort.verify_record(out / f"case{n}.seg.nrrd",
                                    {k: record(out / f"case{n}.seg.nrrd")[k] for k in
                                     ("version", "input_name", "input_fingerprint", "model", "options")})[0]


# --------------------------------------------------------------------------------------------- list files

def _write_dicom_series(folder: Path, image) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.1.7",
                           "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in origin),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.8\\0.8", "0018|0050": "2.5"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)


def test_list_file_input_with_label_maps_and_bad_entries(tmp_path, tiny_model_file, capsys):
    data = tmp_path / "data"
    for patient in ("p1", "p2"):
        (data / patient).mkdir(parents=True)
        sitk.WriteImage(ct_like_volume(shape=SHAPE, seed=len(patient)), str(data / patient / "ct.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(data / "flat.nrrd"))  # 2D
    _write_dicom_series(data / "p3" / "series", ct_like_volume(shape=(3, 24, 24)))
    listing = tmp_path / "cohort.txt"
    listing.write_text("# my cohort\n\ndata/p1/ct.nii.gz\n" + str(data / "p2" / "ct.nii.gz") +
                       "\ndata/flat.nrrd\ndata/missing.nii.gz\ndata/p3/series\n")
    out = tmp_path / "labels"
    assert run(listing, out, "--checkpoint", tiny_model_file, "--device", "cpu", "--suffix", ".nii.gz",
               "--quiet") == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["p1_ct.nii.gz", "p2_ct.nii.gz", "p3_series.nii.gz"]
    assert sitk.ReadImage(str(out / "p1_ct.nii.gz")).GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(out / "p3_series.nii.gz")).GetSize() == (24, 24, 3)
    merged = read_csv(out / "summary.csv")
    rows = by_name(merged)
    assert rows["flat.nrrd"]["status"] == "failed" and "2D" in rows["flat.nrrd"]["error"]
    assert rows["missing.nii.gz"]["status"] == "failed" and rows["missing.nii.gz"]["error"]
    assert sorted(r["status"] for r in merged) == ["failed"] * 2 + ["ok"] * 3

    # CSV with an output column; OUT must be a folder.
    table = tmp_path / "cohort.csv"
    table.write_text("subject,input,output\na,data/p1/ct.nii.gz,first\nb,data/p2/ct.nii.gz,second.seg.nrrd\n")
    assert run(table, tmp_path / "segs", "--checkpoint", tiny_model_file, "--device", "cpu", "--quiet") == 0
    assert sorted(p.name for p in (tmp_path / "segs").glob("*.seg.nrrd")) == ["first.seg.nrrd", "second.seg.nrrd"]
    assert run(table, tmp_path / "x.seg.nrrd", "--checkpoint", tiny_model_file, "--quiet") == 2
    assert "OUT must be a folder" in capsys.readouterr().err


def test_folder_discovery(tmp_path):
    root = make_cohort(tmp_path / "in", good=2, bad=False)
    _write_dicom_series(root / "patientA" / "ct", ct_like_volume(shape=(3, 16, 16)))
    (root / "notes.txt").write_text("x")
    (root / "old.seg.nrrd").write_bytes(b"x")
    (root / "nested").mkdir()
    sitk.WriteImage(ct_like_volume(shape=SHAPE), str(root / "nested" / "label.nii.gz"))  # not top level
    (root / "out").mkdir()
    items = cohort.collect_inputs(root, root / "out")
    assert [i.output_name for i in items] == ["case0.seg.nrrd", "case1.seg.nrrd", "patientA_ct.seg.nrrd"]
    assert cohort.is_cohort_request(root, tmp_path / "results")
    assert not cohort.is_cohort_request(root / "patientA" / "ct", tmp_path / "one.seg.nrrd")  # one DICOM series
    assert not cohort.is_cohort_request(root / "case0.nii.gz", tmp_path / "results")
    same_stem = [tmp_path / "a" / "x.nii.gz", tmp_path / "a" / "x.nrrd"]
    assert [i.output_name for i in cohort.name_outputs(same_stem, ".seg.nrrd")] == ["x_niigz.seg.nrrd",
                                                                                   "x_nrrd.seg.nrrd"]


# ----------------------------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes(tmp_path, tiny_model_file):
    pytest.importorskip("torch.distributed.run")
    inputs = make_cohort(tmp_path / "in", good=3, bad=False)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "hsam", "segment", str(inputs), str(out), "--checkpoint", str(tiny_model_file),
               "--device", "cpu"]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, encoding="utf-8",
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(record(out / f"case{n}.seg.nrrd")["rank"] for n in range(3)) == [0, 0, 1]
    merged = read_csv(out / "summary.csv")  # rank 0, after the barrier
    assert sorted(r["status"] for r in merged) == ["ok"] * 3 and {r["rank"] for r in merged} == {"0", "1"}
