"""The plan grammar measured: how often a plan is unusable with and without it, and what it costs.

    python -m benchmarks.plan_grammar [--model tiny] [--concurrency 8]

Runs the planner (the llm stage's vLLM engines, in process) twice, unconstrained (as the official
code) and constrained (``plan_grammar``), on the same corpus: instructions (the samples and odd
ones: text the tiny model never saw, unicode, a long paragraph, digits) × totals (round and not) ×
seeds, each greedy and sampled (temperature 1, top-p 0.95). Every request ends ``ok`` (a plan with
at least one clip), ``malformed`` (a clip that does not parse), ``no_clip`` or ``error``. Then the
cost on the sample instructions, greedy, at concurrency 1 and ``--concurrency``: plan tokens per
second (every token after the prompt, forced runs included, over the wall time) and time to the
first clip, per mode. Writes ``build/bench/plan_grammar_<model>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from audiostory_ensemble.llm.engine_options import EngineOptions
from audiostory_ensemble.llm.planner import Planner, PlanRequest
from audiostory_ensemble.model import layout
from audiostory_ensemble.model.grammar import NoClipError, PlanError
from audiostory_ensemble.runtime.loop import LoopThread
from audiostory_ensemble.tiny_story import SAMPLE_INSTRUCTIONS
from benchmarks.bench_dit_step import commit, machine

ODD = (
    "A cat meows, then a door slams.",
    "rain falls on a roof, then thunder",
    "Straßenbahn fährt vorbei 🚋 — dann Regen, dann Stille…",
    "3 dogs bark 2 times at 7.5 s, then 1 car honks",
    "wind " + "and more wind, " * 40 + "then calm",
    "!!! ??? ...",
)
TOTALS = (5.0, 12.0, 12.3, 37.5, 60.0)
SEEDS = (0, 1)
SAMPLING = ((0.0, 1.0), (1.0, 0.95))     # (temperature, top_p): greedy, sampled


def corpus() -> list[dict]:
    instructions = [c for c, _ in SAMPLE_INSTRUCTIONS[:4]] + list(ODD)
    return [dict(instruction=i, total=t, seed=s, temperature=temp, top_p=top_p)
            for i in instructions for t in TOTALS for s in SEEDS for temp, top_p in SAMPLING]


async def plan_one(planner: Planner, case: dict, rid: str) -> dict:
    t0 = time.perf_counter()
    first = None
    clips = 0
    try:
        async for _ in planner.plan(PlanRequest(case["instruction"], case["total"], seed=case["seed"],
                                                temperature=case["temperature"], top_p=case["top_p"],
                                                request_id=rid)):
            clips += 1
            first = first if first is not None else time.perf_counter() - t0
        outcome = "ok"
    except NoClipError:
        outcome = "no_clip"
    except PlanError:
        outcome = "malformed"
    except Exception as e:  # noqa: BLE001 - counted, never hidden
        outcome = f"error: {type(e).__name__}: {e}"
    summary = planner.summaries.get(rid)
    return {**case, "outcome": outcome, "clips": clips, "ttfc_s": first, "wall_s": time.perf_counter() - t0,
            "tokens": len(summary.generated_ids) if summary else 0,
            "text": summary.text if summary and outcome != "ok" else ""}


async def run_all(planner: Planner, cases: list[dict], concurrency: int, tag: str) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(k, case):
        async with gate:
            return await plan_one(planner, case, f"{tag}-{k}")

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(k, c) for k, c in enumerate(cases)))
    return list(results), time.perf_counter() - t0


def cost(results: list[dict], wall: float) -> dict:
    ttfc = [r["ttfc_s"] for r in results if r["ttfc_s"] is not None]
    return {"requests": len(results), "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttfc_p50_s": round(statistics.median(ttfc), 3), "ttfc_max_s": round(max(ttfc), 3),
            "wall_s": round(wall, 2)}


def measure(model: str, grammar: bool, concurrency: int) -> dict:
    loop = LoopThread(f"plan-grammar-{grammar}")
    planner = Planner.from_model(model, EngineOptions(plan_grammar=grammar))
    loop.run(planner.start(), timeout=900)
    try:
        cases = corpus()
        results, _ = loop.run(run_all(planner, cases, concurrency, "corpus"), timeout=3600)
        outcomes: dict[str, int] = {}
        for r in results:
            key = r["outcome"] if not r["outcome"].startswith("error") else "error"
            outcomes[key] = outcomes.get(key, 0) + 1
        samples = [dict(instruction=c, total=t, seed=0, temperature=0.0, top_p=1.0) for c, t in SAMPLE_INSTRUCTIONS]
        loop.run(run_all(planner, samples[:2], 1, "warm"), timeout=600)
        costs = {}
        for level in (1, concurrency):
            batch = samples * (3 if level == 1 else level)
            res, wall = loop.run(run_all(planner, batch, level, f"cost{level}"), timeout=1800)
            costs[str(level)] = cost(res, wall)
        return {"plan_grammar": grammar, "outcomes": outcomes,
                "unusable_rate": round(1 - outcomes.get("ok", 0) / len(results), 4),
                "by_sampling": {("greedy" if temp == 0 else "sampled"):
                                sum(r["outcome"] != "ok" for r in results if r["temperature"] == temp)
                                for temp, _ in SAMPLING},
                "failures": [{k: r[k] for k in ("instruction", "total", "seed", "temperature", "outcome", "text")}
                             for r in results if r["outcome"] != "ok"][:40],
                "cost": costs}
    finally:
        planner.shutdown()
        loop.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    report = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "corpus": len(corpus()), "concurrency": args.concurrency,
              "modes": [measure(args.model, grammar, args.concurrency) for grammar in (False, True)]}
    out = layout.BUILD / "bench" / f"plan_grammar_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=2))
    for m in report["modes"]:
        print(json.dumps({k: v for k, v in m.items() if k != "failures"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
