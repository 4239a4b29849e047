"""Training cost of ToMoE against a plain KD step of the dense model with the same tokens.

    python benchmarks/train_step.py                 # CPU always, and the GPU when there is one
    python benchmarks/train_step.py --device cpu --cases embedded

Compared, each in a fresh process (so the peak memory of one does not hide the other's):

* ``tomoe``: ``tomoe.train.training_step`` (teacher forward with routing off, student forward through the masks,
  KD + R_P + R_U + R_L), backward, AdamW step on the routing modules. Exactly what ``tomoe convert`` runs.
* ``kd`` (the reference): the same frozen model without routing. A plain KD step of a frozen model has nothing to
  train, so the reference trains one scalar that multiplies the embedding output of the student forward. Its
  backward therefore runs through the whole frozen stack (the activation gradients of every layer, no weight
  gradients), as ToMoE's must to reach the routing of the first layer. Teacher forward + student forward + the
  same chunked KD loss (``tomoe.losses.kd_loss``) + backward + AdamW step on the scalar.

So the ratio ``tomoe / kd`` is the price of the routing itself: the routers, mask projections, hypernetwork,
the masked activations, the regularisers and their backward, and the AdamW update of the routing parameters.

Step time: both steps run in one process on the same model (routing attached; the ``kd`` step runs with it
switched off), alternating ``kd``, ``tomoe``, ``kd``, ``tomoe``, ... for ``--steps`` rounds after a warm-up round,
so that load from other jobs on a shared machine hits both alike. On a CPU the time is the process CPU time
(``time.process_time``, one thread), which other jobs disturb far less than wall time; on a GPU it is wall time
after ``torch.cuda.synchronize``. Reported: the median per mode and the median of the per-round ratios.

Peak memory: each mode in a fresh process (so the peak of one cannot hide the other's), after one warm-up step:
on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after setup), reported whole and as the part above the memory resident before the
first step (activations, gradients, optimizer state, KD logits).

Cases: the embedded SmolLM2-135M-Instruct, and a Llama-2-7B-shaped stack (hidden 4096, MLP 11008, 32 heads,
vocab 32000) with a few layers and random weights. Results: benchmarks/results/train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)

# case -> device -> settings
CASES = {
    "embedded": {
        "cpu": dict(seq_len=256, batch_size=1, dtype="float32"),
        "cuda": dict(seq_len=2048, batch_size=1, dtype="bfloat16"),
    },
    "llama2-7b-stack": {
        "cpu": dict(seq_len=512, batch_size=1, dtype="float32", layers=2),
        "cuda": dict(seq_len=2048, batch_size=1, dtype="bfloat16", layers=4),
    },
}
MODES = ("kd", "tomoe")


# ------------------------------------------------------------------------------------------------ one measurement
def build_model(case: str, settings: dict, device):
    import torch

    dtype = getattr(torch, settings["dtype"])
    if case == "embedded":
        from tomoe.loading import embedded_model_source, load_model

        return load_model(embedded_model_source(), dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=settings["layers"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def setup(case: str, device_type: str, checkpointing: bool, modes=MODES):
    """The model (with routing attached if ``tomoe`` is among ``modes``) and one full training step per mode.

    ``kd`` runs with the routing switched off (or not attached at all, for its memory measurement).
    """
    import contextlib

    import torch

    from tomoe.config import ToMoEConfig
    from tomoe.families import get_family
    from tomoe.losses import kd_loss
    from tomoe.patch import attach
    from tomoe.train import enable_gradient_checkpointing, training_step

    if device_type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = CASES[case][device_type]
    device = torch.device(device_type)
    model = build_model(case, settings, device)
    family = get_family(model.config)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (settings["batch_size"], settings["seq_len"]), generator=generator).to(device)
    mask = torch.ones_like(input_ids)
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=settings["dtype"] == "bfloat16")
    torch.manual_seed(0)
    routing = attach(model, ToMoEConfig()).train() if "tomoe" in modes else None
    scale = torch.nn.Parameter(torch.ones((), device=device))  # the reference's one trainable number
    student = {"on": False}
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output * scale if student["on"] else None)
    decoder = model.get_decoder()
    if checkpointing:
        enable_gradient_checkpointing(model, family)

    def tomoe_loss():
        terms = training_step(model, routing, input_ids, mask)
        return terms["loss"]

    def kd_loss_():
        with routing.disabled() if routing is not None else contextlib.nullcontext():
            with torch.no_grad():
                teacher = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            student["on"] = True
            hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            student["on"] = False
            return kd_loss(hidden, teacher, lambda h: family.logits(model, h), mask.bool())

    def make_step(loss_fn, params):
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)

        def step():
            with autocast:
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device_type == "cuda":
                torch.cuda.synchronize()

        return step

    steps = {"kd": make_step(kd_loss_, [scale])}
    if routing is not None:
        steps["tomoe"] = make_step(tomoe_loss, list(routing.parameters()))
    info = {"case": case, "device": device_type, "gradient_checkpointing": checkpointing, **settings,
            "num_layers": model.config.num_hidden_layers, "model_params": sum(p.numel() for p in model.parameters()),
            "routing_params": sum(p.numel() for p in routing.parameters()) if routing is not None else None}
    return steps, info


def measure_memory(case: str, mode: str, device_type: str, checkpointing: bool) -> dict:
    import gc

    import torch

    steps, info = setup(case, device_type, checkpointing, modes=(mode,))
    gc.collect()
    if device_type == "cuda":
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = _rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(2):  # the first step also creates the AdamW state
        steps[mode]()
    peak = torch.cuda.max_memory_allocated() if device_type == "cuda" else _rss_bytes("VmHWM")
    return {**info, "mode": mode, "peak_bytes": peak, "resident_bytes": resident, "step_peak_bytes": peak - resident}


def measure_time(case: str, device_type: str, rounds: int, checkpointing: bool) -> dict:
    steps, info = setup(case, device_type, checkpointing)
    clock = time.process_time if device_type == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(rounds + 1):
        for mode in MODES:
            began = clock()
            steps[mode]()
            if round_ > 0:  # round 0 warms up (allocator, AdamW state, kernels)
                times[mode].append(clock() - began)
    ratios = [t / k for t, k in zip(times["tomoe"], times["kd"])]
    return {**info, "clock": "process CPU time" if device_type == "cpu" else "wall", "times_s": times,
            "step_s": {mode: statistics.median(values) for mode, values in times.items()}, "ratio_median": statistics.median(ratios)}


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ------------------------------------------------------------------------------------------------ driver
def machine(device_type: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "threads": int(os.environ.get("OMP_NUM_THREADS", "1"))}
    if device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _child(*args: str) -> dict:
    command = [sys.executable, __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return record


def run_case(case: str, device_type: str, rounds: int, checkpointing: bool) -> dict:
    flag = str(int(checkpointing))
    timing = _child("--time", case, device_type, str(rounds), flag)
    print(f"  {case} ckpt={checkpointing}: {timing['step_s']} ratio {timing['ratio_median']:.3f}, load {timing['load_avg_1min']}", flush=True)
    memory = {mode: _child("--memory", case, mode, device_type, flag) for mode in MODES}
    for mode, m in memory.items():
        print(f"  {case} {mode} ckpt={checkpointing}: peak {m['peak_bytes'] / 2**30:.3f} GiB (+{m['step_peak_bytes'] / 2**30:.3f})", flush=True)
    return {**{k: v for k, v in timing.items() if k not in ("times_s", "step_s", "ratio_median", "load_avg_1min", "clock")},
            "clock": timing["clock"], "time": {"step_s": timing["step_s"], "times_s": timing["times_s"], "ratio_median": timing["ratio_median"],
                                               "load_avg_1min": timing["load_avg_1min"]},
            "memory": {mode: {k: m[k] for k in ("peak_bytes", "resident_bytes", "step_peak_bytes", "load_avg_1min")} for mode, m in memory.items()}}


def write_results(records: list[dict], machines: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "train_step.json"
    old = json.loads(path.read_text()) if path.is_file() else {"records": [], "machines": {}}
    key = lambda r: (r["case"], r["device"], r["gradient_checkpointing"])  # noqa: E731
    new = {key(r) for r in records}
    kept = [r for r in old["records"] if key(r) not in new]
    data = {"records": kept + records, "machines": {**old.get("machines", {}), **machines}}
    path.write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "train_step.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    gib = 2**30
    lines = [
        "# ToMoE training step vs a plain KD step (same tokens, same frozen model)",
        "",
        "Generated by `python benchmarks/train_step.py` (method in its docstring). `kd`: teacher forward + student forward + "
        "KD loss + backward through the whole frozen stack to one trainable scalar on the embedding output + AdamW. "
        "`tomoe`: `tomoe.train.training_step` (the same plus routing, masks and R_P/R_U/R_L) + backward + AdamW on the "
        "routing modules. Targets: time <= 1.15x, peak memory <= 1.1x. Time on a CPU is process CPU time with one thread.",
        "",
        "| case | device | dtype | layers | tokens | grad ckpt | kd step (s) | tomoe step (s) | **time ratio** | kd peak (GiB) | tomoe peak (GiB) | **peak ratio** | kd above resident (GiB) | tomoe above resident (GiB) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["records"]:
        t, m = r["time"], r["memory"]
        kd, tm = m["kd"], m["tomoe"]
        lines.append(
            f"| {r['case']} | {r['device']} | {r['dtype']} | {r['num_layers']} | {r['batch_size']}x{r['seq_len']} | "
            f"{'yes' if r['gradient_checkpointing'] else 'no'} | {t['step_s']['kd']:.3f} | {t['step_s']['tomoe']:.3f} | "
            f"**{t['ratio_median']:.2f}x** | {kd['peak_bytes'] / gib:.3f} | {tm['peak_bytes'] / gib:.3f} | "
            f"**{tm['peak_bytes'] / kd['peak_bytes']:.2f}x** | {kd['step_peak_bytes'] / gib:.3f} | {tm['step_peak_bytes'] / gib:.3f} | "
            f"{tm['step_peak_bytes'] / kd['step_peak_bytes']:.2f}x |"
        )
    lines += ["", "Machines: " + "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in data["machines"].items()),
              "", "Per-round times and the load average (1 min) before/after each measurement are in train_step.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--memory", "--time"):
        if sys.argv[1] == "--memory":
            case, mode, device_type, checkpointing = sys.argv[2:6]
            print(json.dumps(measure_memory(case, mode, device_type, bool(int(checkpointing)))))
        else:
            case, device_type, rounds, checkpointing = sys.argv[2:6]
            print(json.dumps(measure_time(case, device_type, int(rounds), bool(int(checkpointing)))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (one kd + one tomoe step each) after a warm-up round")
    parser.add_argument("--gradient-checkpointing", choices=("no", "yes", "both"), default="both",
                        help="also measure with HF gradient checkpointing ('both': on the 7B stack only)")
    args = parser.parse_args()
    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    records, machines = [], {}
    for device_type in devices:
        machines[device_type] = machine(device_type)
        for case in args.cases:
            variants = {"no": [False], "yes": [True], "both": [False, True] if case != "embedded" else [False]}[args.gradient_checkpointing]
            for checkpointing in variants:
                records.append(run_case(case, device_type, args.rounds, checkpointing))
    write_results(records, machines)
    print((RESULTS / "train_step.md").read_text())


if __name__ == "__main__":
    main()
