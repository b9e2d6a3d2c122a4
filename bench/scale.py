"""Flat cost as the work grows: the main job at 1x, 4x and 16x the fixture cases, against a stand-in server.

    python bench/scale.py                       # 1x, 4x, 16x (about a minute on 2 cores)
    python bench/scale.py --scales 1,4 --profile  # and a cProfile of the largest scale's pytest process

Each scale is `pytest evals -k triage` through the real plugin, in a subprocess, on a triage dataset made
from fixtures/triage/vignettes.jsonl: every case repeated SCALE times, each copy with its own id and its own
small change of text (so no two prompts are equal and no answer comes from another's cache entry). The
model is persona_eval.testing.standin.StandInServer, served from this process on 127.0.0.1 with no latency,
answering "## Final Response\\nC"; the result cache is off (--pe-no-cache), so every request reaches it.

Per scale: cases, requests (as the server counted them), the pytest process's wall seconds, CPU seconds
and peak RSS, and the size of cases.jsonl. The suite's own time is the pytest process's CPU time: the
server runs in this process, so the time spent answering is not in it (summary.json's model_seconds is
no help here: it adds up the time of requests that were in flight together). A run with --pe-limit 1
measures what a run costs whatever its size (start-up, imports, collection, the report's fixed parts);
`net_cpu_ms_per_case` is what remains per case. That figure, and peak RSS, should stay flat: the ratios
are to 1x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures/triage/vignettes.jsonl"
SERVED_NAME = "standin"
ANSWER = "## Final Response\nC"


def scaled_dataset(scale: int, path: Path) -> None:
    """Write the fixture cases `scale` times over to `path` (copy 0 is the fixture itself)."""
    cases = [json.loads(line) for line in FIXTURES.read_text(encoding="utf-8").splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as out:
        for copy in range(scale):
            for case in cases:
                if copy:
                    # The vignette is `text` or built from the intake fields, `presenting_symptoms` first.
                    field = "text" if "text" in case else "presenting_symptoms"
                    case = dict(case, id=f"{case['id']}-copy{copy}", **{field: f"{case[field]} (visit {copy + 1})"})
                out.write(json.dumps(case, ensure_ascii=False) + "\n")


def run_pytest(label: str, dataset: Path, work: Path, base_url: str, *, extra: list[str], timeout: float,
               profile: bool) -> dict[str, Any]:
    """One `pytest evals -k triage` run on `dataset`; its figures."""
    reports = work / f"reports-{label}"
    log_path = work / f"pytest-{label}.log"
    command = [sys.executable]
    if profile:
        command += ["-m", "cProfile", "-o", str(work / f"pytest-{label}.prof")]
    command += ["-m", "pytest", "evals", "-k", "triage", "-q", "-p", "no:cacheprovider",
                "--pe-model", f"openai:{SERVED_NAME}@{base_url}", "--pe-dataset", f"triage={dataset}",
                "--pe-no-cache", "--pe-cache-dir", str(work / "cache"), "--pe-reports-dir", str(reports),
                "--pe-quiet", *extra]
    with log_path.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        # wait4, not wait: the rusage of this one process (peak RSS, CPU), not of every child so far.
        while (waited := os.wait4(process.pid, os.WNOHANG))[0] == 0:
            if time.perf_counter() - started > timeout:
                process.kill()
                waited = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
    process.returncode = status = os.waitstatus_to_exitcode(waited[1])  # reaped here, not by Popen
    usage = waited[2]
    run_dir = (reports / "latest").resolve()
    if not (run_dir / "summary.json").is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{label}: pytest exited {status} without a summary.json:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    meta, personas = summary["metadata"], len(summary["personas"])
    with (run_dir / "cases.jsonl").open(encoding="utf-8") as cases_file:
        records = sum(1 for line in cases_file if line.strip())
    return {
        "cases": records // max(personas, 1), "personas": personas, "records": records, "exit_status": status,
        "requests": meta["cache"]["requests"],
        "wall_seconds": round(wall, 3), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        # Linux gives ru_maxrss in KiB: the pytest process's, or its largest waited-for child's.
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "run_duration_seconds": meta["duration_seconds"], "inference_seconds": meta["inference_seconds"],
        "cases_jsonl_mib": round((run_dir / "cases.jsonl").stat().st_size / 2**20, 3),
    }


def with_ratios(fixed: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its per-case figures (net of the fixed run's cost) and their ratios to the first (1x)."""
    for row in rows:
        added = row["cases"] - fixed["cases"]
        row["cpu_ms_per_case"] = round(1000 * row["cpu_seconds"] / row["cases"], 3)
        row["net_cpu_ms_per_case"] = round(1000 * (row["cpu_seconds"] - fixed["cpu_seconds"]) / added, 3)
        row["net_wall_ms_per_case"] = round(1000 * (row["wall_seconds"] - fixed["wall_seconds"]) / added, 3)
    base = rows[0]
    for row in rows:
        for figure in ("net_cpu_ms_per_case", "net_wall_ms_per_case", "peak_rss_mib"):
            row[f"{figure}_ratio"] = round(row[figure] / base[figure], 3)
    return rows


def markdown(fixed: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["| scale | cases | requests | wall s | CPU s | net CPU ms/case | ratio | net wall ms/case | ratio "
             "| peak RSS MiB | ratio | cases.jsonl MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| fixed (--pe-limit 1) | {fixed['cases']} | {fixed['requests']} | {fixed['wall_seconds']:.1f} "
             f"| {fixed['cpu_seconds']:.1f} | | | | | {fixed['peak_rss_mib']:.0f} | | {fixed['cases_jsonl_mib']:.2f} |"]
    for row in rows:
        lines.append(f"| {row['scale']}x | {row['cases']} | {row['requests']} | {row['wall_seconds']:.1f} "
                     f"| {row['cpu_seconds']:.1f} | {row['net_cpu_ms_per_case']:.2f} "
                     f"| {row['net_cpu_ms_per_case_ratio']:.2f} | {row['net_wall_ms_per_case']:.2f} "
                     f"| {row['net_wall_ms_per_case_ratio']:.2f} | {row['peak_rss_mib']:.0f} "
                     f"| {row['peak_rss_mib_ratio']:.2f} | {row['cases_jsonl_mib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,4,16", help="comma-separated multiples of the fixture cases")
    parser.add_argument("--latency", type=float, default=0.0, help="the stand-in's seconds per answer (0)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one pytest run may take (900)")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest scale's pytest process and "
                        "print its 25 costliest functions (cumulative) to stderr")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (datasets, runs, logs)")
    args = parser.parse_args()
    scales = sorted({int(s) for s in args.scales.split(",")})
    work = Path(tempfile.mkdtemp(prefix="pe-scale-"))
    from persona_eval.testing.standin import StandInServer

    rows = []
    try:
        # The fixed cost first (one case per stratum), then each scale; a server per run, so that what it
        # keeps of each request does not carry over. It stops by itself after its lifetime, whatever
        # happens here.
        for scale in [0, *scales]:
            dataset = work / f"triage-{max(scale, 1)}x.jsonl"
            scaled_dataset(max(scale, 1), dataset)
            label = f"{scale}x" if scale else "fixed"
            with StandInServer(served_name=SERVED_NAME, root="/models/standin", latency=args.latency,
                               lifetime=args.timeout + 60, answer=lambda messages: ANSWER) as server:
                row = run_pytest(label, dataset, work, server.base_url, extra=[] if scale else ["--pe-limit", "1"],
                                 timeout=args.timeout, profile=args.profile and scale == scales[-1])
                row["server_chat_completions"] = server.chat_completions
            rows.append({"scale": scale, **row})
        fixed, rows = rows[0], with_ratios(rows[0], rows[1:])
        report = {"cpu_count": os.cpu_count(), "latency": args.latency, "answer": ANSWER, "fixed": fixed,
                  "scales": rows}
        print(json.dumps(report, indent=2))
        print()
        print(markdown(fixed, rows))
        if args.profile:
            import pstats

            stats = pstats.Stats(str(work / f"pytest-{scales[-1]}x.prof"), stream=sys.stderr)
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(15)
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
