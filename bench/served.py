"""How busy the suite keeps a served model: the main job (`pytest evals -k triage`, 6 personas x 104 cases =
624 requests) against the stand-in OpenAI-compatible server of persona_eval.testing, and through a 429 storm.

    python bench/served.py                 # both (about a minute on 2 cores)
    python bench/served.py --only busy     # 0.5 s per request, room for every request at once
    python bench/served.py --only storm    # a server that takes 32 at once and refuses the rest with 429

`busy`: the server answers every request after `--latency` seconds (default 0.5) and takes any number at
once, as a GPU server with room to spare: what bounds the run is how many requests the suite keeps in
flight. Reported: the server's time from the first request to the last answer, the suite's own figures
(requests sent, mean and most in flight) from the run's summary.json, and the whole command's wall time.

`storm`: the server takes 32 requests at once, refuses the rest with HTTP 429 (Retry-After: 1 s), and for
the first 3 s after the first request refuses everything, as a hosted API's rate limit does. Reported: the
429s served, the lowest the suite's adaptive limit went, and whether every case was answered exactly once
(nothing lost, nothing asked twice) with every record in cases.jsonl.

Prints a JSON document; the README's figures come from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NAME = "served"
ANSWER = "## Final Response\nC"


def _run_main_job(server: Any, work: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [sys.executable, "-m", "pytest", "evals", "-k", "triage", "-q", "-p", "no:cacheprovider",
               "--pe-model", f"openai:{NAME}@{server.base_url}", "--pe-no-cache", "--pe-quiet",
               "--pe-cache-dir", str(work / "cache"), "--pe-reports-dir", str(work / "reports")]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    return run, time.perf_counter() - started


def _summary(work: Path) -> dict[str, Any]:
    return dict(json.loads((work / "reports" / "latest" / "summary.json").read_text()))


def _cases(work: Path) -> list[dict[str, Any]]:
    path = work / "reports" / "latest" / "cases.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def busy(latency: float) -> dict[str, Any]:
    from persona_eval.testing.standin import StandInServer

    work = Path(tempfile.mkdtemp(prefix="pe-bench-served-"))
    try:
        with StandInServer(served_name=NAME, answer=lambda messages: ANSWER, latency=latency,
                           prefix_cache=True, lifetime=900) as server:
            run, wall = _run_main_job(server, work)
            serving, chats, peak = server.serving_seconds, server.chat_completions, server.max_in_flight
        row = _summary(work)["metadata"]["throughput"][NAME]
        return {"latency_seconds": latency, "requests": chats, "server_seconds": round(serving, 2),
                "server_max_in_flight": peak, "suite_sent": row.get("sent"),
                "suite_mean_in_flight": row.get("mean_in_flight"), "suite_max_in_flight": row.get("max_in_flight"),
                "prefix_cache_hit_rate": row.get("prefix_cache_hit_rate"), "command_seconds": round(wall, 2),
                "exit_status": run.returncode}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def storm(capacity: int = 32, storm_seconds: float = 3.0) -> dict[str, Any]:
    from persona_eval.testing.standin import StandInServer

    work = Path(tempfile.mkdtemp(prefix="pe-bench-storm-"))
    try:
        with StandInServer(served_name=NAME, answer=lambda messages: ANSWER, latency=0.05, capacity=capacity,
                           retry_after=1.0, lifetime=900) as server:
            def storm_at_the_first_request() -> None:
                deadline = time.monotonic() + 600
                while server.chat_completions == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                server.rate_limit(storm_seconds)
            threading.Thread(target=storm_at_the_first_request, daemon=True).start()
            run, wall = _run_main_job(server, work)
            answers, faults = server.answers, server.faults
        cases = _cases(work)
        row = _summary(work)["metadata"]["throughput"][NAME]
        return {"capacity": capacity, "storm_seconds": storm_seconds, "rate_limited_429": faults["rate_limit"],
                "answered": sum(answers.values()), "conversations": len(answers),
                "each_answered_once": set(answers.values()) == {1}, "records": len(cases),
                "records_answered": sum(1 for c in cases if c["generated_text"]),
                "suite_limit_lowest": row.get("limit_lowest"), "suite_limit_ceiling": row.get("limit_ceiling"),
                "command_seconds": round(wall, 2), "exit_status": run.returncode,
                "errors": [line for line in run.stdout.splitlines() + run.stderr.splitlines() if "Error" in line][:5]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("busy", "storm"), help="run one benchmark")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per request for `busy` (0.5)")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    if args.only in (None, "busy"):
        report["busy"] = busy(args.latency)
    if args.only in (None, "storm"):
        report["storm"] = storm()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
