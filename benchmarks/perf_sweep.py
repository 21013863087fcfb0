"""perf_analyzer concurrency sweep against a running server, as a load tester would type it.

    python -m benchmarks.perf_sweep [--url 127.0.0.1:8001] [--concurrency 1:8:2] [--models audiostory audiostory_full]

For each model it runs (and prints) a command of this form and saves the CSV under build/bench/:

    build/bin/perf_analyzer -m audiostory -i grpc -u 127.0.0.1:8001 --streaming \\
        --input-data benchmarks/perf/requests.json --concurrency-range 1:8:2 \\
        --measurement-mode count_windows --measurement-request-count 8 --max-trials 6 \\
        --stability-percentage 50 -f build/bench/perf_audiostory.csv

``audiostory`` is decoupled: ``--streaming`` is required and perf_analyzer times the first response
(the first clip). ``audiostory_full`` returns the whole story in one response.
"""
import argparse
import shlex
import subprocess
import sys

from audiostory_ensemble.model import layout

PERF = layout.BUILD / "bin" / "perf_analyzer"
DATA = layout.PROJECT_ROOT / "benchmarks" / "perf" / "requests.json"


def command(model: str, url: str, concurrency: str, count: int, stability: int) -> list[str]:
    cmd = [str(PERF), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(DATA),
           "--concurrency-range", concurrency, "--measurement-mode", "count_windows",
           "--measurement-request-count", str(count), "--max-trials", "6",
           "--stability-percentage", str(stability),
           "-f", str(layout.BUILD / "bench" / f"perf_{model}.csv")]
    if model == "audiostory":
        cmd.append("--streaming")
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--concurrency", default="1:8:2", help="start:end:step")
    ap.add_argument("--requests", type=int, default=8, help="requests per measurement window")
    ap.add_argument("--models", nargs="+", default=["audiostory", "audiostory_full"])
    ap.add_argument("--stability", type=int, default=50,
                    help="perf_analyzer --stability-percentage: the input set mixes 18-60 s stories, so "
                         "windows of a few requests differ by more than perf_analyzer's default 10 %%")
    args = ap.parse_args(argv)
    if not PERF.exists():
        print(f"{PERF} not found: run `make setup`", file=sys.stderr)
        return 2
    (layout.BUILD / "bench").mkdir(parents=True, exist_ok=True)
    for model in args.models:
        cmd = command(model, args.url, args.concurrency, args.requests, args.stability)
        print("$ " + shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
