"""``kdforge bench opd-da``: K = 3 PPO policies on CartPole — independent, OPD-mean and OPD-DA, several seeds.

Reported per variant (mean ± sample std over seeds): environment steps per policy until the group-mean
training return (each policy's last 10 episodes) first reaches 475, the area under that learning curve
(its mean over training), the final deterministic evaluation return (group mean and best policy), and the
homogenisation monitor (mean pairwise Jensen–Shannon divergence on a fixed probe set). The spec expects
diversity independent > OPD-DA > OPD-mean; the table reports it and asserts nothing.
``kdforge bench opd-da-minatar`` (not part of the default run) is the optional DQN row on MinAtar Breakout.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.bench import BENCHES
from kdforge.bench.common import bench_dir, fmt_mean_std, machine_note, markdown_table, restores_threads, write_json

COMMAND = "kdforge bench opd-da"
SEEDS = (0, 1, 2, 3)
K = 3
UPDATES = 390  # rollouts of 4 envs x 128 steps: 199,680 environment steps per policy
THRESHOLD = 475.0
LOWER = 400.0  # a second, easier threshold: stochastic training returns of a solved policy hover near 475
EVAL_EPISODES = 10
#: (label, distill section); every other key is the PPO default (CleanRL's CartPole PPO)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("independent", {"lambda_dec": 0.0, "lambda_feat": 0.0}),
    ("OPD-mean", {"aggregation": "mean", "lambda_dec": 1.0, "lambda_feat": 0.0}),
    ("OPD-DA", {"aggregation": "attention", "lambda_dec": 1.0, "lambda_feat": 0.1}),
    # the remedy for attention collapsing onto the identity: attend to the peers only
    ("OPD-DA, peers only", {"aggregation": "attention", "lambda_dec": 1.0, "lambda_feat": 0.1, "include_self": False}),
]
OPTIM = {"name": "adam", "lr": 2.5e-4, "eps": 1e-5, "weight_decay": 0.0}


def recipe(variant: dict[str, Any], seed: int, updates: int, quick: bool, algo: str = "ppo",
           env: str = "CartPole-v1", extra: dict[str, Any] | None = None, optim: dict[str, Any] | None = None) -> Any:
    """The engine recipe of one group run."""
    from kdforge.config import Recipe

    method = {"name": algo, "env": env, "num_policies": K, "steps_per_epoch": updates,
              "eval_episodes": 2 if quick else EVAL_EPISODES, "distill": variant, **(extra or {})}
    if quick and algo == "ppo":
        method["num_steps"] = 32
    return Recipe.from_dict({"name": f"opd-da-{seed}", "seed": seed, "method": method, "optim": optim or OPTIM,
                             "sched": {"name": "linear" if algo == "ppo" else "constant"},
                             "train": {"max_steps": updates, "progress": "silent", "device": "cpu", "threads": 1}})


def run_group(r: Any) -> dict[str, Any]:
    """Train one group through the engine; its per-update curves, final evaluation and wall time."""
    from kdforge.engine.callbacks import Callback
    from kdforge.engine.trainer import Trainer, seed_everything
    from kdforge.method import build_method

    curve: list[dict[str, float]] = []

    class _Curve(Callback):
        def on_step_end(self, trainer: Any, out: dict[str, Any]) -> None:
            curve.append({k: float(v.detach().float()) for k, v in out.items() if v.numel() == 1})

    t0 = time.perf_counter()
    seed_everything(r.seed)
    method = build_method(r.method.model_dump(), None)  # type: ignore[arg-type]
    res = Trainer(method, None, r, source=method.step_source(r), callbacks=[_Curve()]).fit()
    return {"curve": curve, "final": res.test_last, "time_s": time.perf_counter() - t0}


def summarise(run: dict[str, Any], k: int = K, threshold: float = THRESHOLD, lower: float = LOWER) -> dict[str, float]:
    """Steps to the threshold (NaN if never), mean group return over training (AUC / steps), final returns, JS."""
    steps = np.array([c["env_steps"] for c in run["curve"]])
    rets = np.array([[c[f"ret{m}"] for m in range(k)] for c in run["curve"]])
    group = np.nanmean(np.where(np.isnan(rets), 0.0, rets), axis=1)  # before a policy's first episode: 0
    hit, hit_lower = np.nonzero(group >= threshold)[0], np.nonzero(group >= lower)[0]
    js = np.array([c.get("js", np.nan) for c in run["curve"]])  # DQN logs it every 100 steps
    warm = len(js) // 10
    return {"steps_to_threshold": float(steps[hit[0]]) if len(hit) else float("nan"),
            "steps_to_lower": float(steps[hit_lower[0]]) if len(hit_lower) else float("nan"),
            "auc": float(np.mean(group)), "final": run["final"]["return"], "final_best": run["final"]["return_best"],
            "js": float(np.nanmean(js[warm:])), "js_final": float(np.nanmean(js[-max(1, warm):])),
            "time_s": run["time_s"]}


def _fmt_steps(vals: list[float]) -> str:
    got = [v for v in vals if not np.isnan(v)]
    if not got:
        return f"not reached (0/{len(vals)})"
    s = f"{statistics.fmean(got) / 1000:.0f}k"
    if len(got) > 1:
        s += f" ± {statistics.stdev(got) / 1000:.0f}k"
    return s + f" ({len(got)}/{len(vals)} reached)"


def _plot(runs: dict[str, list[dict[str, Any]]], path: Path, key: str, ylabel: str, title: str, k: int = K) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rs in runs.items():
        steps = np.array([c["env_steps"] for c in rs[0]["curve"]])
        if key == "return":
            ys = np.array([[np.nanmean([c[f"ret{m}"] if not np.isnan(c[f"ret{m}"]) else 0.0 for m in range(k)])
                            for c in r["curve"]] for r in rs])
        else:
            ys = np.array([[c.get(key, np.nan) for c in r["curve"]] for r in rs])
            keep = ~np.isnan(ys).any(0)
            steps, ys = steps[keep], ys[:, keep]
        mean, std = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(ys.shape[1])
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="environment steps per policy", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _page(name: str, title: str, intro: str, command: str, table: list[dict[str, Any]], total_s: float,
          per_run: str, seeds: tuple[int, ...], images: list[str], settings: str) -> str:
    return "\n".join([
        f"# {title}", "", intro, "",
        f"Command: `{command}` (pinned to one core: `OMP_NUM_THREADS=1 taskset -c 1 {command}`). Seeds: "
        f"{', '.join(map(str, seeds))}; mean ± sample std over seeds.", "",
        markdown_table(table), "",
        *[f"![{i}]({i})" for i in images], "",
        "## Set-up", "", settings, "",
        f"Machine: {machine_note()} (2-core x86-64 VM, CPU only, pinned to one core, 1 thread). Wall time "
        f"{total_s / 60:.1f} min; {per_run}.", ""])


@BENCHES.register("opd-da")
@restores_threads
def run(out: Path | None = None, quick: bool = False) -> Path:
    """PPO on CartPole, K = 3: independent, OPD-mean and OPD-DA over seeds; the table and the curves."""
    out = bench_dir("opd-da", out)
    t_start = time.perf_counter()
    seeds = SEEDS[:1] if quick else SEEDS
    updates = 6 if quick else UPDATES
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, variant in VARIANTS:
        runs[label] = []
        for s in seeds:
            runs[label].append(run_group(recipe(variant, s, updates, quick)))
            print(f"opd-da: {label} seed {s}: {summarise(runs[label][-1])}", flush=True)
    table, raw = [], {}
    for label, _ in VARIANTS:
        sm = [summarise(r) for r in runs[label]]
        raw[label] = {"summary": sm, "curves": [r["curve"] for r in runs[label]]}
        table.append({
            "variant": label,
            f"steps to group mean ≥ {THRESHOLD:.0f}": _fmt_steps([x["steps_to_threshold"] for x in sm]),
            f"steps to group mean ≥ {LOWER:.0f}": _fmt_steps([x["steps_to_lower"] for x in sm]),
            "mean training return (AUC/steps)": fmt_mean_std([x["auc"] for x in sm], 1),
            f"final eval return (group mean, {2 if quick else EVAL_EPISODES} ep.)": fmt_mean_std(
                [x["final"] for x in sm], 1),
            "final eval return (best policy)": fmt_mean_std([x["final_best"] for x in sm], 1),
            "JS divergence ×10³ (after 10%)": fmt_mean_std([1e3 * x["js"] for x in sm], 2),
            "JS ×10³ (last 10%)": fmt_mean_std([1e3 * x["js_final"] for x in sm], 2),
            "time / run (s)": f"{statistics.fmean(x['time_s'] for x in sm):.0f}",
        })
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, out / "opd-da-return.png", "return", "group-mean training return (last 10 episodes)",
          "PPO CartPole-v1, K = 3 (mean ± std over seeds)")
    _plot(runs, out / "opd-da-js.png", "js", "mean pairwise JS divergence (nats)",
          "Homogenisation monitor on a fixed probe set")
    total = time.perf_counter() - t_start
    steps = updates * 4 * (32 if quick else 128)
    settings = (f"PPO (CleanRL's CartPole settings: 4 envs x {32 if quick else 128} steps, 4 epochs x 4 minibatches, "
                "Adam lr 2.5e-4 eps 1e-5 annealed linearly, γ 0.99, GAE λ 0.95, clip 0.2, entropy 0.01, value 0.5, "
                "grad-norm 0.5 per policy; separate 2x64 tanh actor and critic trunks) for "
                f"{updates} rollouts = {steps:,} environment steps per policy, K = {K} policies per group. "
                "OPD-mean: target = uniform mean of the group's logits (self included), λ_dec 1, no feature loss. "
                "OPD-DA: decision-attention (W_Q, W_K 64→8, no scaling, self included, targets not detached), "
                "λ_dec 1, λ_feat 0.1 (feature target stop-gradient), τ 3, ramp-up over the first 10% of updates; "
                "distillation on the union of the K minibatches. OPD-DA, peers only: the same with "
                "`include_self: false` (α_mm = 0). Training return: each policy's mean over its "
                "last 10 finished episodes (stochastic actions); the group mean counts a policy without a finished "
                "episode as 0. Final evaluation: greedy actions, test episodes on seeds 100000+i, the same for every "
                "policy (validation episodes, which pick `best`, play seeds 200000+i; the whole run is one engine "
                "epoch here, so best = last). Probe set: 256 states of a uniformly random policy (seed 107919). "
                "Budget chosen so the whole bench fits 25 minutes on one core.")
    per_run = "; ".join(f"{r['variant']}: {r['time / run (s)']} s per group run" for r in table)
    intro = ("Online policy distillation with decision-attention (Yu et al., IJCNN 2024; reconstructed, see "
             "[the method page](../methods/opd-da.md)) against its baselines. The spec infers diversity "
             "independent > OPD-DA > OPD-mean; this page reports what was measured and asserts no ordering.")
    page = _page("opd-da", "OPD-DA: PPO on CartPole-v1, K = 3", intro, f"{COMMAND} --publish", table, total,
                 per_run, seeds, ["opd-da-return.png", "opd-da-js.png"], settings)
    (out / "opd-da.md").write_text(page)
    write_json(out / "opd-da.json", {"command": COMMAND, "seeds": list(seeds), "updates": updates,
                                     "threshold": THRESHOLD, "table": table, "runs": raw, "wall_time_s": total})
    print(markdown_table(table))
    return out


MINATAR_UPDATES = 100_000  # DQN train steps (one per environment step): 100k environment steps per policy


@BENCHES.register("opd-da-minatar")
@restores_threads
def run_minatar(out: Path | None = None, quick: bool = False) -> Path:
    """The optional DQN row: K = 3 DQN policies on MinAtar Breakout, independent vs OPD-DA (Boltzmann τ 1)."""
    out = bench_dir("opd-da-minatar", out)
    t_start = time.perf_counter()
    seeds = SEEDS[:1] if quick else SEEDS[:3]
    updates = 300 if quick else MINATAR_UPDATES
    extra = {"buffer_size": 100_000, "batch_size": 32, "target_network_frequency": 1000, "start_e": 1.0,
             "end_e": 0.1, "exploration_fraction": 0.1, "learning_starts": 100 if quick else 5000,
             "train_frequency": 1, "steps_per_epoch": updates}
    variants = [("independent", {"lambda_dec": 0.0, "lambda_feat": 0.0}),
                ("OPD-DA", {"aggregation": "attention", "lambda_dec": 1.0, "lambda_feat": 0.1, "tau": 1.0,
                            "q_standardize": True})]
    optim = {"name": "adam", "lr": 2.5e-4, "eps": 1e-5, "weight_decay": 0.0}
    runs: dict[str, list[dict[str, Any]]] = {}
    table = []
    for label, v in variants:
        runs[label] = [run_group(recipe(v, s, updates, quick, "dqn", "MinAtar/Breakout-v1", extra, optim))
                       for s in seeds]
        sm = [summarise(r, threshold=float("inf")) for r in runs[label]]
        table.append({"variant": label, "mean training return": fmt_mean_std([x["auc"] for x in sm], 2),
                      "final eval return (group mean)": fmt_mean_std([x["final"] for x in sm], 2),
                      "final eval return (best policy)": fmt_mean_std([x["final_best"] for x in sm], 2),
                      "JS ×10³": fmt_mean_std([1e3 * x["js"] for x in sm], 2),
                      "time / run (s)": f"{statistics.fmean(x['time_s'] for x in sm):.0f}"})
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, out / "opd-da-minatar-return.png", "return", "group-mean training return",
          "DQN MinAtar Breakout, K = 3")
    total = time.perf_counter() - t_start
    settings = (f"DQN (MinAtar paper settings except Adam: replay 100k, batch 32, target copy every 1000 steps, "
                f"ε 1 → 0.1 over 10% of steps, learning starts 5000, one update per step) for {updates:,} "
                "environment steps per policy; OPD-DA on Boltzmann distributions of per-state standardised Q, τ 1.")
    page = _page("opd-da-minatar", "OPD-DA: DQN on MinAtar Breakout, K = 3", "The optional DQN row.",
                 "kdforge bench opd-da-minatar", table, total, "", seeds, ["opd-da-minatar-return.png"], settings)
    (out / "opd-da-minatar.md").write_text(page)
    write_json(out / "opd-da-minatar.json", {"table": table, "wall_time_s": total})
    print(markdown_table(table))
    return out
