"""A stand-in for ``python -m hsam.worker`` with the same command line and protocol, and scripted behaviour.

    python fake_worker.py segment --input IN.nrrd --output OUT.nrrd [--model ID | --checkpoint F] [--device D]
    python fake_worker.py finetune --image IMG.nrrd --labels LAB.nrrd --labels-table T.json --slices S --base B ...

``FAKE_WORKER_MODE`` (environment) picks what it does:

ok         writes a label map on IN's grid and a Result: label 1 (spleen) where IN > ``FAKE_BONE_HU`` (array
           order), label 5 (liver) inside the RAS sphere ``FAKE_SPHERE`` = "x,y,z,r" (physical geometry), the
           Synapse label set; one Progress per slice (``FAKE_DELAY`` seconds each)
error      a few Progress messages, then Error(kind="model"), exit 2
crash      a traceback on stderr and exit 3, no Error message
garbage    prints non-protocol text on stdout, exit 1
noresult   progress only, exit 0 without a Result
hang       starts a child process that sleeps, writes both pids to ``FAKE_PIDFILE``, reports progress, sleeps
badgrid    like ok but the label map's spacing differs from IN's
badlabels  like ok but writes label value 42, which the label set does not define

finetune (same modes where they make sense): checks that the labels lie on the image's grid, writes what it
received (arguments, label values per listed slice, the label table) as JSON to ``FAKE_ARGS_FILE``, reports
``embed`` and ``train`` progress with validation Dice log lines, writes a placeholder model file at
``FAKE_MODEL_OUT`` and returns it as the Result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk

from hsam import worker_protocol as wp
from hsam.data.labels import SYNAPSE_ORGANS


def send(message) -> None:
    sys.stdout.write(wp.encode(message) + "\n")
    sys.stdout.flush()


def labels_for(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image)  # k, j, i
    labels = np.zeros(array.shape, np.uint8)
    labels[array > float(os.environ.get("FAKE_BONE_HU", "500"))] = 1
    sphere = os.environ.get("FAKE_SPHERE")
    if sphere:
        x, y, z, r = (float(v) for v in sphere.split(","))
        k, j, i = np.meshgrid(*(np.arange(n) for n in array.shape), indexing="ij")
        index = np.stack([i.ravel(), j.ravel(), k.ravel()]).astype(float)  # ITK index order (i, j, k)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        lps = (direction @ (np.diag(image.GetSpacing()) @ index)) + np.array(image.GetOrigin())[:, None]
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None]
        inside = (((ras - np.array([[x], [y], [z]])) ** 2).sum(axis=0) <= r * r).reshape(array.shape)
        labels[inside] = 5
    return labels


def finetune_main(argv: list[str]) -> int:
    import json

    parser = argparse.ArgumentParser()
    for name in ("--image", "--labels", "--labels-table", "--slices", "--base"):
        parser.add_argument(name, required=True)
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    mode = os.environ.get("FAKE_WORKER_MODE", "ok")
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    send(wp.Progress(0, 1, stage="load"))
    image, labels = sitk.ReadImage(args.image), sitk.ReadImage(args.labels)
    same_grid = (image.GetSize() == labels.GetSize() and
                 np.allclose(image.GetSpacing(), labels.GetSpacing()) and
                 np.allclose(image.GetOrigin(), labels.GetOrigin()) and
                 np.allclose(image.GetDirection(), labels.GetDirection()))
    slices = [int(k) for k in args.slices.split(",")]
    array = sitk.GetArrayFromImage(labels)
    with open(os.environ["FAKE_ARGS_FILE"], "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "same_grid": same_grid, "image_name": os.path.basename(args.image),
                   "values": {k: sorted(int(v) for v in np.unique(array[k])) for k in slices},
                   "nonzero": {k: int((array[k] > 0).sum()) for k in slices},
                   "table": json.load(open(args.labels_table, encoding="utf-8"))}, fh)
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_PIDFILE"], "w") as fh:
            fh.write(f"{os.getpid()} {child.pid}\n")
        send(wp.Progress(1, len(slices), stage="embed"))
        time.sleep(600)
        return 0
    for done in range(len(slices) + 1):
        send(wp.Progress(done, len(slices), stage="embed"))
    for epoch in range(1, args.epochs + 1):
        if mode == "error" and epoch == 2:
            send(wp.Error(message="label values [42] (in corrected slices [3]) are not in the label set", kind="input"))
            return 2
        send(wp.Log(f"epoch {epoch}/{args.epochs}: loss {1 / epoch:.4f} (stage 1 0.1, stage 2 0.1, w 0.5), "
                    f"validation Dice {0.5 + 0.1 * epoch:.4f}"))
        send(wp.Progress(epoch, args.epochs, stage="train"))
        if delay:
            time.sleep(delay)
    out = os.environ["FAKE_MODEL_OUT"]
    with open(out, "wb") as fh:
        fh.write(b"fake model")
    send(wp.Result(output=out, labels=json.load(open(args.labels_table, encoding="utf-8")), model="fake-ft-model",
                   seconds=0.1))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["finetune"]:
        return finetune_main(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model")
    parser.add_argument("--checkpoint")
    parser.add_argument("--sam-checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--guide-labels")
    parser.add_argument("--guide-slices")
    args = parser.parse_args()
    if os.environ.get("FAKE_ARGS_FILE"):
        import json

        image, guide = sitk.ReadImage(args.input), None
        if args.guide_labels:
            labels = sitk.ReadImage(args.guide_labels)
            guide = {"same_grid": labels.GetSize() == image.GetSize() and
                     np.allclose(labels.GetSpacing(), image.GetSpacing()) and
                     np.allclose(labels.GetOrigin(), image.GetOrigin()) and
                     np.allclose(labels.GetDirection(), image.GetDirection()),
                     "nonzero": int((sitk.GetArrayFromImage(labels) > 0).sum())}
        with open(os.environ["FAKE_ARGS_FILE"], "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "guide": guide}, fh)
    mode = os.environ.get("FAKE_WORKER_MODE", "ok")
    delay = float(os.environ.get("FAKE_DELAY", "0"))

    send(wp.Progress(0, 1, stage="load"))
    send(wp.Log(f"fake model {args.model or args.checkpoint} on {args.device}"))
    if mode == "crash":
        sys.stderr.write("Traceback (most recent call last):\n  File \"worker.py\", line 1\n"
                         "RuntimeError: CUDA error: an illegal memory access was encountered\n")
        sys.stderr.flush()
        return 3
    if mode == "garbage":
        print("Downloading weights... 100%", flush=True)
        return 1
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_PIDFILE"], "w") as fh:
            fh.write(f"{os.getpid()} {child.pid}\n")
        send(wp.Progress(1, 100, stage="segment"))
        time.sleep(600)
        return 0

    image = sitk.ReadImage(args.input)
    slices = image.GetSize()[2]
    for done in range(slices + 1):
        send(wp.Progress(done, slices, stage="segment"))
        if mode == "error" and done == 2:
            send(wp.Error(message="checksum mismatch for 220_epoch_299.pth: the file is damaged, delete it or run "
                                  "`hsam models fetch hsam-synapse-10pct`", kind="model"))
            return 2
        if delay:
            time.sleep(delay)
    if mode == "noresult":
        return 0
    labels = labels_for(image)
    if mode == "badlabels":
        labels[0, 0, 0] = 42
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    if mode == "badgrid":
        out.SetSpacing(tuple(s * 2 for s in image.GetSpacing()))
    sitk.WriteImage(out, args.output, True)
    send(wp.Result(output=args.output, labels=SYNAPSE_ORGANS.to_json(), model=args.model or "fake",
                   warnings=["fake warning: this is not a real model"], seconds=0.1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
