"""Peak memory of each export step: `python -m cptquant.bench.export_memory --json OUT -- MODEL [cptq-export options]`.

Runs `cptq-export` in this (fresh) process while a thread samples the resident set size (VmRSS: anonymous
and file-backed pages, memory maps included) every 20 ms, labelling each sample with the step then running
(progress.step_listeners); "load and passes" is everything before the export's first step. Writes the peak
per step, the process's own high-water mark (ru_maxrss, which also sees what a 20 ms sampler may miss), the
FP32 weight bytes of the model folder (its safetensors) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

SAMPLE_S = 0.02
BEFORE_STEPS = "load and passes"


def resident_bytes() -> int:
    return resident_split()["total"]


def resident_split() -> dict[str, int]:
    """VmRSS and its parts: anonymous pages (the heap: tensors, arrays) and file-backed ones (memory-mapped
    weights, which the kernel may drop under pressure but which count while mapped)."""
    fields = {"VmRSS:": "total", "RssAnon:": "anon", "RssFile:": "file"}
    found = dict.fromkeys(fields.values(), 0)
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":", 1)[0] + ":"
            if key in fields:
                found[fields[key]] = int(line.split()[1]) * 1024
    return found


class StepPeaks:
    """Peak resident bytes per label, in the order the labels first appeared."""

    def __init__(self) -> None:
        self.label = BEFORE_STEPS
        self.peaks: dict[str, int] = {}
        self.split: dict[str, dict[str, int]] = {}  # label -> anon / file bytes at its peak sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> StepPeaks:
        from ..progress import step_listeners

        step_listeners.append(self.relabel)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from ..progress import step_listeners

        self._stop.set()
        self._thread.join()
        step_listeners.remove(self.relabel)

    def relabel(self, label: str) -> None:
        self.label = label

    def _sample(self) -> None:
        while not self._stop.is_set():
            sample, label = resident_split(), self.label
            if sample["total"] > self.peaks.get(label, -1):
                self.peaks[label] = sample["total"]
                self.split[label] = {"anon": sample["anon"], "file": sample["file"]}
            time.sleep(SAMPLE_S)


def weight_bytes(model_dir: Path) -> int:
    """FP32 bytes of the model's weights as stored (its safetensors files)."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("export_args", nargs=argparse.REMAINDER, help="-- MODEL [cptq-export options]")
    args = parser.parse_args(argv)
    export_args = [a for a in args.export_args if a != "--"]
    from ..cli import export_main

    start = time.perf_counter()
    code = 0
    with StepPeaks() as peaks:
        sys.argv = ["cptq-export", *export_args]
        try:
            export_main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    weights = weight_bytes(Path(export_args[0])) if Path(export_args[0]).is_dir() else 0
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"command": ["cptq-export", *export_args], "exit_code": code, "wall_s": time.perf_counter() - start,
              "fp32_weight_bytes": weights, "peak_bytes": high_water, "peak_over_weights": high_water / weights if weights else None,
              "steps": peaks.peaks, "steps_anon_file": peaks.split}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
