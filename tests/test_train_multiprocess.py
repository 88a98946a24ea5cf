"""Training (stages 0-3) on 2 CPU processes (torchrun, gloo, ``ACCELERATE_USE_CPU=1``) gives the losses of 1
process with the same global batch; resume works on 2 processes; Eq. 7's in-batch form gathers across processes;
2 processes starting together on an empty slide cache both train; ``hwsi eval`` on 2 processes writes what 1 writes
(docs/cluster.md "Training on several processes").

Launched with ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on this file (its ``__main__``
is the worker), NOT ``accelerate launch`` (on this CPU it gives no 2-process run: one process, or two independent
copies). Every training run checks ``RUN/stageN/processes.json`` (written by hwsi.train.processes): accelerate saw
2 processes = WORLD_SIZE, two pids, and the ranks' items of each step are disjoint and together the 1-process run's.

Batching compared (global batch 4): stage 1 one process micro-batch 2 (accumulation 2) vs two processes
micro-batch 1 (accumulation 2) — the same items at every micro-step; stages 0, 2, 3 micro-batch 1 on both
(accumulation 4 vs 2) — the same micro-batches (the LM loss is a token mean per micro-batch). Stage 1 runs three
ways: the banks (``eq6: pooled``), the in-batch Eq. 7 (``eq6: v1``) and the banks with a trainable text tower (its
last MiniLM block, dropout off: see :func:`_without_dropout`), and the banks again with 2 DataLoader workers per
rank (``data.num_workers``), which must log exactly the in-process run's losses.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_eval_tasks import cohort, llm_dir  # noqa: F401  (module fixtures: the eval cohort and its tiny LLM)

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
# 1 vs 2 processes: the same sums in another order (float32); measured max abs 1.4e-6, rel 1.1e-6 (docs/cluster.md)
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
TIMEOUT_S = 600


def _torchrun(plan: list[dict], where: Path) -> None:
    """Run the worker on 2 processes; fail with every rank's output (torchrun passes it through) on error/timeout."""
    plan_path = where / f"plan-{len(list(where.glob('plan-*.json')))}.json"
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    cmd = ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), __file__, str(plan_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks
        out, err = p.communicate()
        pytest.fail(f"torchrun timed out after {TIMEOUT_S} s\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-8000:]}")
    assert p.returncode == 0, f"torchrun exit {p.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-8000:]}"


def _rows(stage_dir: Path) -> list[dict[str, float]]:
    from hwsi.train.engine import MetricsLog

    return [{k: float(v) for k, v in r.items() if k not in ("seconds",)} for r in MetricsLog(stage_dir /
                                                                                            "metrics.csv").rows()]


def _compare(one: Path, two: Path, diffs: dict[str, tuple[float, float]], name: str) -> None:
    """Every logged loss and term of the 2-process run within tolerance of the 1-process run."""
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) > 0 and [r["step"] for r in a] == [r["step"] for r in b]
    assert set(a[0]) == set(b[0])
    worst_abs = worst_rel = 0.0
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            d = abs(ra[k] - rb[k])
            worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, d / max(abs(ra[k]), 1e-12))
            assert d <= LOSS_ATOL + LOSS_RTOL * abs(ra[k]), (name, ra["step"], k, ra[k], rb[k])
    assert len({r["loss"] for r in a}) > 1  # it trained
    diffs[name] = (worst_abs, worst_rel)


def _check_processes(one: Path, two: Path) -> None:
    """2 real processes (not two copies), each with a different shard; together the 1-process run's items."""
    rec1 = json.loads((one / "processes.json").read_text())
    rec2 = json.loads((two / "processes.json").read_text())
    assert rec1["num_processes"] == 1
    assert rec2["num_processes"] == rec2["world_size_env"] == WORLD
    assert rec2["distributed_type"].endswith("MULTI_CPU"), rec2["distributed_type"]
    procs = rec2["processes"]
    assert [p["rank"] for p in procs] == list(range(WORLD)) and len({p["pid"] for p in procs}) == WORLD
    ref = rec1["processes"][0]["first_steps"]
    assert ref and all(len(p["first_steps"]) == len(ref) for p in procs)
    for step, items in enumerate(ref):
        shards = [p["first_steps"][step] for p in procs]
        assert all(shards), (step, shards)
        assert not set(shards[0]) & set(shards[1]), (step, shards)
        assert sorted(shards[0] + shards[1]) == sorted(items), (step, shards, items)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """1-process reference runs (in this process) and the 2-process runs of one torchrun session."""
    from hwsi.config import save_config
    from hwsi.train.stages import run_stage
    from test_train import make_job, tiny_config

    root = tmp_path_factory.mktemp("ddp")
    job = make_job(root)

    def config(stage1_micro: int, eq6: str = "pooled", text_layers: int = 0, workers: int = 0) -> Path:
        cfg = tiny_config(stage1=4, stage2=3, stage3=4)
        cfg.stage0.max_steps, cfg.stage0.batch_size, cfg.stage0.micro_batch_size = 3, 4, 1
        for st in (cfg.stage1, cfg.stage2, cfg.stage3):
            st.batch_size, st.micro_batch_size, st.checkpoint_every = 4, 1, 1
        cfg.stage1.micro_batch_size = stage1_micro
        cfg.stage1.loss.eq6 = eq6
        if eq6 == "v1":  # the earlier reading: words/phrases/sentences, Eq. 7 over the batch (no report bank)
            cfg.stage1.loss.scales = ("cells", "patches", "regions")
        cfg.stage1.text_finetune_layers, cfg.stage1.text_refresh_every = text_layers, 2
        cfg.data.num_workers = workers  # stage 1's DataLoader workers (hwsi.train.loader)
        path = root / f"cfg-{stage1_micro}-{eq6}-{text_layers}-{workers}.yaml"
        save_config(cfg, path)
        return path

    from hwsi.train.config import load_train_config

    one, two, one_v1, two_v1 = config(2), config(1), config(2, "v1"), config(1, "v1")
    one_tt, two_tt = config(2, text_layers=1), config(1, text_layers=1)
    two_w = config(1, workers=2)
    ref, ref_v1, ref_tt = root / "ref", root / "ref_v1", root / "ref_tt"
    for s in range(4):
        assert run_stage(s, load_train_config(one), job, ref, progress=False).finished
    assert run_stage(1, load_train_config(one_v1), job, ref_v1, progress=False).finished
    with pytest.MonkeyPatch.context() as mp:
        _without_dropout(mp)
        assert run_stage(1, load_train_config(one_tt), job, ref_tt, progress=False).finished
    d = root / "two"
    for name, parts in (("s2", ("stage0", "stage1")), ("s3", ("stage0", "stage1", "stage2")),
                        ("s3r", ("stage0", "stage1", "stage2"))):
        (d / name).mkdir(parents=True)
        shutil.copy(ref / "config.yaml", d / name / "config.yaml")
        for part in parts:  # the earlier stages' weights, NOT the slide cache: each run starts with an empty one
            shutil.copytree(ref / part, d / name / part)
    base = {"kind": "stage", "job": str(job)}
    _torchrun([{**base, "stage": 0, "config": str(two), "out": str(d / "s0")},
               {**base, "stage": 1, "config": str(two), "out": str(d / "s1")},
               {**base, "stage": 1, "config": str(two_w), "out": str(d / "s1w")},
               {**base, "stage": 1, "config": str(two_v1), "out": str(d / "s1v1")},
               {**base, "stage": 1, "config": str(two_tt), "out": str(d / "s1tt"), "no_dropout": True},
               {**base, "stage": 2, "config": str(two), "out": str(d / "s2")},
               {**base, "stage": 3, "config": str(two), "out": str(d / "s3")},
               {**base, "stage": 3, "config": str(two), "out": str(d / "s3r"), "stop_after": 2}], root)
    _torchrun([{**base, "stage": 3, "config": str(two), "out": str(d / "s3r"), "resume": True}], root)
    return {"ref": ref, "ref_v1": ref_v1, "ref_tt": ref_tt, "two": d, "job": job, "diffs": {}}


def _without_dropout(mp: pytest.MonkeyPatch) -> None:
    """Dropout off (nn.Dropout and SDPA's attention dropout): its masks are each process's own random draws, so with
    dropout 2 processes train a different (equally likely) run than 1 process; the MiniLM text tower has both."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    mp.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    mp.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa(*a, **{**k, "dropout_p": 0.0}))


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses_of_stages_0_to_3(runs: dict) -> None:
    ref, d, diffs = runs["ref"], runs["two"], runs["diffs"]
    for stage, one, two in ((0, ref / "stage0", d / "s0" / "stage0"), (1, ref / "stage1", d / "s1" / "stage1"),
                            (1, ref / "stage1", d / "s1w" / "stage1"),
                            (1, runs["ref_v1"] / "stage1", d / "s1v1" / "stage1"),
                            (1, runs["ref_tt"] / "stage1", d / "s1tt" / "stage1"),
                            (2, ref / "stage2", d / "s2" / "stage2"), (3, ref / "stage3", d / "s3" / "stage3")):
        _check_processes(one, two)
        _compare(one, two, diffs, f"{two.parent.name}/stage{stage}")
        assert (two / "result.json").is_file()
    header = (d / "s1v1" / "stage1" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "L_wsi" in header  # the in-batch Eq. 7 (no report bank in eq6 v1) took part
    losses = [[r["loss"] for r in _rows(d / name / "stage1")] for name in ("s1", "s1w")]
    assert losses[0] == losses[1]  # 2 DataLoader workers per rank: bit for bit the in-process loading's losses
    print("1 vs 2 processes, max |diff| / rel:", {k: (f"{a:.2e}", f"{r:.2e}") for k, (a, r) in diffs.items()})


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_equal_the_uninterrupted_run(runs: dict) -> None:
    d = runs["two"]
    straight, resumed = d / "s3" / "stage3", d / "s3r" / "stage3"
    rec = json.loads((resumed / "processes.json").read_text())
    assert rec["num_processes"] == rec["world_size_env"] == WORLD and rec["start_step"] == 2
    first = [p["first_steps"] for p in rec["processes"]]  # the resumed session's steps 3-4: each rank its own items
    assert len({p["pid"] for p in rec["processes"]}) == WORLD and len(first[0]) == len(first[1]) == 2
    assert all(a and b and not set(a) & set(b) for a, b in zip(*first, strict=True)), first
    a = (straight / "metrics.csv").read_text().splitlines()
    b = (resumed / "metrics.csv").read_text().splitlines()
    col = a[0].split(",").index("loss")
    assert len(a) == 5 and [x.split(",")[col] for x in a] == [x.split(",")[col] for x in b]  # bit for bit
    assert json.loads((resumed / "result.json").read_text())["metrics"]["steps"] == 4
    assert (resumed.parent / "stage3" / "final" / "lora" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_two_processes_on_an_empty_cache_both_build_and_train(runs: dict) -> None:
    """s1, s2, s3 started with no RUN/cache: the ranks shared the build out, both trained, no temporary left."""
    d = runs["two"]
    slides = sorted(p.stem for p in (runs["job"] / "stores").glob("*.h5"))
    for name in ("s1", "s2", "s3"):
        (folder,) = (d / name / "cache").glob("inputs-*")
        assert sorted(p.stem for p in folder.glob("*.pt")) == slides
        assert not [p for p in folder.iterdir() if p.suffix != ".pt"]
        rec = json.loads((d / name / f"stage{name[1]}" / "processes.json").read_text())
        assert [len(p["first_steps"]) > 0 for p in rec["processes"]] == [True] * WORLD


def test_in_batch_eq7_on_two_processes_is_the_one_process_loss_of_the_concatenated_batch(tmp_path: Path) -> None:
    """Loss (mean over ranks) and the DDP-averaged gradients of slides and reports equal the 1-process ones."""
    from hwsi.model.losses import slide_report_loss

    _torchrun([{"kind": "eq7", "out": str(tmp_path / "eq7")}], tmp_path)
    z, rep, ids = _eq7_inputs()
    z.requires_grad_(True)
    rep.requires_grad_(True)
    full = slide_report_loss(z, rep, ids, tau=0.1)
    full.backward()
    got = [torch.load(tmp_path / "eq7" / f"rank{r}.pt") for r in range(WORLD)]
    b = z.shape[0] // WORLD
    torch.testing.assert_close(torch.stack([g["loss"] for g in got]).mean(), full.detach(), rtol=1e-6, atol=1e-6)
    for r, g in enumerate(got):
        assert g["world"] == WORLD
        # DDP averages parameter gradients over the processes: grad / WORLD is the 1-process gradient
        torch.testing.assert_close(g["z_grad"] / WORLD, z.grad[r * b:(r + 1) * b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g["rep_grad"] / WORLD, rep.grad[r * b:(r + 1) * b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g["loss_frozen_reports"], g["loss"])
        # without the gather each process would contrast with its own 2 reports only: a different loss
        assert abs(float(g["loss_local"]) - float(g["loss"])) > 1e-3


def test_a_launch_whose_world_size_accelerate_does_not_see_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORLD_SIZE=2 but this process's accelerate state is a single process (two copies would train): LaunchError."""
    from hwsi.train.processes import LaunchError, process_state

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_state("cpu").num_processes == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match=r"WORLD_SIZE is 2 but accelerate runs 1 process\(es\)"):
        process_state("cpu")


def test_too_few_items_for_the_accumulation_is_one_error(tmp_path: Path) -> None:
    """4 items, global batch 8 = micro 1 × accumulation 8: no step could give every micro-step an item."""
    from hwsi.train.config import OptimConfig
    from hwsi.train.engine import Engine, TrainError

    engine = Engine(tmp_path, OptimConfig(batch_size=8, micro_batch_size=1), seed=0, progress=False, device="cpu")
    with pytest.raises(TrainError, match="4 items, fewer than accumulation 8"):
        engine.batch_plan(4)
    assert engine.batch_plan(8) == (8, 1)
    assert engine._micro_batches(list(range(8))) == [[i] for i in range(8)]


@pytest.mark.slow
def test_hwsi_eval_command_on_two_processes_writes_what_one_process_writes(runs: dict, tmp_path: Path) -> None:
    """`torchrun ... -m hwsi.cli eval` on the trained 1-process run: the same files as `hwsi eval` in one process."""
    from hwsi.cli import main

    recs = []  # WSI-Bench test records (question_id, image, question, T-answer, metadata), hwsi.data.wsi_bench
    for sid in sorted(p.stem for p in (runs["job"] / "stores").glob("*.h5")):
        recs += [{"question_id": f"Report_{sid}_1", "image": sid, "question": "Write the report.",
                  "T-answer": f"Report of {sid}.", "metadata": "Report"},
                 {"question_id": f"Open_{sid}_1", "image": sid, "question": "What is the grade?",
                  "T-answer": "low grade.", "metadata": "Open"}]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["eval", "--task", "report", "--task", "vqa", "--data", str(data), "--job", str(runs["job"]), "--model",
            str(runs["ref"]), "--max-new-tokens", "4", "--no-meteor", "--convention", "coco", "--coco-tokenizer",
            "simple", "--answer-batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) in (0, None)
    _torchrun([{"kind": "cli", "args": [*args, "--out", str(tmp_path / "two")], "record": str(tmp_path / "ranks")}],
              tmp_path)
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["num_processes"] == r["world_size_env"] == WORLD for r in ranks) and len({r["pid"] for r in ranks}) == 2
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "report.json" in written and "vqa.json" in written
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == written
    for name in written:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


EVAL_CFG = dict(limit=4, max_new_tokens=5, meteor=False, convention="coco", coco_tokenizer="simple", batch_size=3)


def _counted_eval(cohort: Path, llm_dir: Path, out: Path | None) -> dict[str, int]:
    """Every task of hwsi eval on test_eval_tasks.py's cohort and tiny model; how many slides this process ran
    through the hierarchy (slide embeddings and the visual tokens of the questions; a forward hook)."""
    from hwsi.eval.eval_config import EvalConfig
    from hwsi.eval.tasks import TASKS, load_eval_data, run_all
    from test_eval_tasks import HashTextEncoder, make_model

    model = make_model(llm_dir)
    g = torch.Generator().manual_seed(1)  # LLM weights redrawn N(0, 0.2²) (norms kept), as test_generate_batched.py:
    with torch.no_grad():  # at the default init every answer is empty (EOS first), which would compare nothing
        for name, p in model.llm.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    seen = {"slides": 0}
    model.hierarchy.register_forward_hook(lambda m, args, out: seen.__setitem__(
        "slides", seen["slides"] + args[0].patch_feats.shape[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1: same reduction order, so identical bytes
    try:
        run_all(model, load_eval_data(cohort), EvalConfig(**EVAL_CFG), tasks=TASKS, out=out,
                text_encoder=HashTextEncoder())
    finally:
        torch.set_num_threads(threads)
    return seen


def test_eval_on_two_processes_writes_what_one_process_writes(cohort: Path, llm_dir: Path, tmp_path: Path) -> None:
    """Every task's JSON and the summary are byte-identical; the two ranks split the work (the slides each ran
    through the hierarchy add up to the one process's, and each ran some)."""
    one = _counted_eval(cohort, llm_dir, tmp_path / "one")
    _torchrun([{"kind": "eval", "cohort": str(cohort), "llm": str(llm_dir), "out": str(tmp_path / "two")}], tmp_path)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["num_processes"] == r["world_size_env"] == WORLD for r in ranks)
    assert all(r["slides"] > 0 for r in ranks) and sum(r["slides"] for r in ranks) == one["slides"], (ranks, one)
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "summary.md" in written and "report.json" in written
    for task in ("report", "vqa", "caption"):
        preds = [p["prediction"] for p in json.loads((tmp_path / "one" / f"{task}.json").read_text())["predictions"]]
        assert all(preds) and len(set(preds)) > 1, (task, preds)  # real answers are compared
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("rank")) == written
    for name in written:
        a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / "two" / name).read_bytes()
        assert a == b, name


def _eq7_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global batch of 6 slide tokens and reports (reports 1 and 4 identical text: ids equal)."""
    g = torch.Generator().manual_seed(7)
    z, rep = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    return z, rep, torch.tensor([0, 1, 2, 3, 1, 5])


# ----------------------------------------------------------------------------------------------- the worker
def _worker_eq7(out: Path) -> None:
    import torch.distributed as dist

    from hwsi.model.losses import slide_report_loss
    from hwsi.train.processes import process_state

    state = process_state("cpu")
    assert state.num_processes == int(os.environ["WORLD_SIZE"]) == dist.get_world_size()
    r = state.process_index
    z, rep, ids = _eq7_inputs()
    b = z.shape[0] // state.num_processes
    zl = z[r * b:(r + 1) * b].clone().requires_grad_(True)
    rl = rep[r * b:(r + 1) * b].clone().requires_grad_(True)
    loss = slide_report_loss(zl, rl, ids[r * b:(r + 1) * b], tau=0.1, gather=True)
    loss.backward()
    frozen = slide_report_loss(zl.detach(), rl.detach(), ids[r * b:(r + 1) * b], tau=0.1, gather=True)
    local = slide_report_loss(zl.detach(), rl.detach(), ids[r * b:(r + 1) * b], tau=0.1)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"loss": loss.detach(), "z_grad": zl.grad, "rep_grad": rl.grad, "loss_frozen_reports": frozen,
                "loss_local": local, "world": state.num_processes}, out / f"rank{r}.pt")


def _worker_eval(item: dict) -> None:
    from hwsi.train.processes import process_state

    state = process_state("cpu")
    out = Path(item["out"])
    seen = _counted_eval(Path(item["cohort"]), Path(item["llm"]), out if state.is_main_process else None)
    state.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps({
        **seen, "num_processes": state.num_processes, "world_size_env": int(os.environ["WORLD_SIZE"])}))


def _worker(plan_path: str) -> None:
    import logging

    from hwsi.train.config import load_train_config
    from hwsi.train.stages import run_stage

    logging.basicConfig(level=logging.WARNING)
    for item in json.loads(Path(plan_path).read_text()):
        if item["kind"] == "cli":
            from hwsi.cli import main

            assert main(item["args"]) in (0, None)
            if item.get("record"):  # which process this was, as accelerate saw it (the test checks 2 = WORLD_SIZE)
                from hwsi.train.processes import process_state

                state, where = process_state("cpu"), Path(item["record"])
                where.mkdir(parents=True, exist_ok=True)
                (where / f"rank{state.process_index}.json").write_text(json.dumps({
                    "num_processes": state.num_processes, "world_size_env": int(os.environ["WORLD_SIZE"]),
                    "pid": os.getpid()}))
            continue
        if item["kind"] in ("eq7", "eval"):
            _worker_eq7(Path(item["out"])) if item["kind"] == "eq7" else _worker_eval(item)
            continue
        with pytest.MonkeyPatch.context() as mp:
            if item.get("no_dropout"):
                _without_dropout(mp)
            res = run_stage(item["stage"], load_train_config(item["config"]), item["job"], item["out"],
                            resume=item.get("resume", False), stop_after=item.get("stop_after"), progress=False)
        assert res.finished == (item.get("stop_after") is None), item


if __name__ == "__main__":
    _worker(sys.argv[1])
