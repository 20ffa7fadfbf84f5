"""``dpkernels profile``: argument validation, the result schema, summary and plots, isolation of
experiments, and the memory breakdown adding up to the measured total (within TOLERANCE)."""

from __future__ import annotations

import copy
import io
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from dpkernels.__main__ import main as dpkernels_main
from dpkernels.profiling import experiments, launcher, profile
from dpkernels.profiling.breakdown import COMPONENTS, PHASES, TOLERANCE
from dpkernels.profiling.experiments import experiment_specs
from dpkernels.profiling.launcher import Progress, new_run_dir, run_matrix
from dpkernels.profiling.profile import main
from dpkernels.profiling.runner import measure
from dpkernels.profiling.report import summary_text
from dpkernels.profiling.step import STEP_MODES

TINY = ["--models", "linear", "--seq", "8", "--batch", "2", "--steps", "1", "--warmup", "1", "--no-plots"]
RECORD_KEYS = {
    "schema", "experiment", "status", "error", "config", "peak_memory_mb", "median_time_ms", "avg_time_ms", "min_time_ms", "max_time_ms", "time_spread", "tokens_per_s", "step_times_ms",
    "breakdown", "snapshots", "run", "memory_source", "device", "versions", "started_at", "wall_s",
}


def spec(mode: str, model: str = "linear", T: int = 8, B: int = 2, **over) -> dict:
    settings = {"modes": [mode], "models": [model], "seq": [T], "batch": [B], "size": "small", "steps": 1, "warmup": 0,
                "grad_accum": 1, "optimizer": "adam", "amp": "none", "device": "cpu", "threads": None, "gpus": 1, "layers": None}
    settings.update(over)
    return experiment_specs(settings)[0]


# ---- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "nosuch"], "unknown mode 'nosuch'"),
        (["--models", "resnet"], "unknown model 'resnet'"),
        (["--batch", "-1"], "must be a positive integer"),
        (["--seq", "0"], "must be a positive integer"),
        (["--steps", "0"], "must be a positive integer"),
        (["--warmup", "-2"], "must be >= 0"),
        (["--preset", "nosuch"], "invalid choice"),
        (["--preset", "llama-fsdp"], "needs 2 CUDA GPUs"),
        (["--gpus", "2", "--modes", "nondp", "ghost"], "shards the model with FSDP2: modes nondp"),
        (["--single", "{}"], "--single and --result go together"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    if argv[:2] == ["--preset", "llama-fsdp"] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs that the preset needs")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("model", experiments.TRANSFORMERS_MODELS)
def test_a_transformers_model_without_transformers_names_the_extra(model, monkeypatch, capsys):
    real_find_spec = profile.importlib.util.find_spec
    monkeypatch.setattr(profile.importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "gpt", model, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"models {model} are built from transformers configs" in err and ".[models]" in err


def test_cuda_without_a_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_help_documents_modes_presets_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpkernels_main(["profile", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in (*STEP_MODES, *experiments.PRESETS, *experiments.MODELS, "--grad-accum", "--steps", "--preset", "hooks = opacus_hooks"):
        assert word in text


def test_modes_come_from_step_modes_and_accept_aliases():
    parser = profile.build_parser()
    settings = profile.resolve(parser.parse_args(["--modes", "hooks,nondp", "bk"]), parser)
    assert settings["modes"] == ["opacus_hooks", "nondp", "bk"]
    assert profile.resolve(parser.parse_args([]), parser)["modes"] == list(STEP_MODES)


def test_preset_values_are_overridden_by_explicit_options():
    parser = profile.build_parser()
    settings = profile.resolve(parser.parse_args(["--preset", "seed002", "--batch", "2"]), parser)
    assert settings["models"] == ["bert"] and settings["seq"] == [128] and settings["grad_accum"] == 4
    assert settings["batch"] == [2]


def test_default_matrix_is_a_small_gpt_comparison_on_cpu():
    parser = profile.build_parser()
    specs = experiment_specs(profile.resolve(parser.parse_args(["--device", "cpu"]), parser))
    assert {s["model"] for s in specs} == {"gpt"} and {s["size"] for s in specs} == {"small"}
    assert {s["mode"] for s in specs} == set(STEP_MODES)


# ---- a whole run: JSON, summary, plots -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    code = main([*TINY, "--modes", "nondp", "opacus_hooks", "bk", "--grad-accum", "2", "--steps", "2", "--out", str(out)])
    (run_dir,) = out.iterdir()
    return code, run_dir


def records_of(run_dir: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("linear_*.json"))]


def test_run_writes_one_json_per_experiment_with_the_schema(tiny_run):
    code, run_dir = tiny_run
    assert code == 0
    assert run_dir.name.startswith("run_")
    records = records_of(run_dir)
    assert [r["experiment"] for r in records] == ["linear_T8_B2_bk", "linear_T8_B2_nondp", "linear_T8_B2_opacus_hooks"]
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert r["status"] == "ok" and r["memory_source"] == "tensor_tracker"
        assert r["peak_memory_mb"] > 0 and len(r["step_times_ms"]) == 2 and all(t > 0 for t in r["step_times_ms"])
        assert set(r["breakdown"]["components_mb"]) == set(COMPONENTS)
        assert r["run"]["steps"] == 3 and r["run"]["grad_accum"] == 2
        assert {s["phase"] for s in r["snapshots"]} <= set(PHASES)
        assert r["versions"]["torch"] == torch.__version__ and r["device"]["type"] == "cpu"
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*"))


def test_run_timeline_has_every_micro_batch(tiny_run):
    _, run_dir = tiny_run
    nondp = json.loads((run_dir / "linear_T8_B2_nondp.json").read_text())
    forwards = [(s["step"], s["micro_batch"]) for s in nondp["run"]["snapshots"] if s["phase"] == "after_forward"]
    assert forwards == [(step, micro) for step in range(3) for micro in range(2)]


def test_summary_shows_ratios_and_both_measurements(tiny_run):
    _, run_dir = tiny_run
    text = (run_dir / "summary.txt").read_text()
    assert "x nondp" in text and "step peak" in text and "run peak" in text
    assert "linear_T8_B2_opacus_hooks" in text and "Single-step breakdown" in text
    # two micro-batches per step: the second one's forward runs while the first one's gradients are held
    assert "gradients accumulated over micro-batches" in text


def test_plots_are_written(tmp_path, tiny_run):
    from dpkernels.profiling.plots import write_plots

    _, run_dir = tiny_run
    paths = write_plots(records_of(run_dir), tmp_path)
    assert {p.name for p in paths} == {"memory_breakdown.png", "memory_timeline.png", "seq_scaling.png", "tradeoff.png", "overhead.png"}
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_every_timed_step_is_recorded_with_its_median_and_spread(tiny_run):
    _, run_dir = tiny_run
    for r in records_of(run_dir):
        times = r["step_times_ms"]
        assert r["median_time_ms"] == pytest.approx(statistics.median(times)) and r["avg_time_ms"] == pytest.approx(statistics.fmean(times))
        assert (r["min_time_ms"], r["max_time_ms"]) == (min(times), max(times))
        assert r["time_spread"] == pytest.approx((max(times) - min(times)) / statistics.median(times))
        c = r["config"]
        assert r["tokens_per_s"] == pytest.approx(c["global_batch"] * c["tokens"] / (r["median_time_ms"] / 1e3))


def with_times(record: dict, times: list) -> dict:
    return {**copy.deepcopy(record), "step_times_ms": list(times)}


def time_row(text: str, experiment_mode: str) -> str:
    (row,) = [line for line in text.splitlines() if line.split()[:2] == ["linear_T8_B2", experiment_mode]]
    return row


def test_summary_gives_median_and_range_and_flags_unsteady_ratios(tiny_run):
    """The times seen in issue 14 (ghost 573, 1559, 1439 ms against nondp 775, 768, 514 ms) give a
    flagged ratio; steady steps (within 10%) do not."""
    _, run_dir = tiny_run
    by_mode = {r["config"]["mode"]: r for r in records_of(run_dir)}
    settings = json.loads((run_dir / "run.json").read_text())["settings"]
    unsteady = [with_times(by_mode["nondp"], [775, 768, 514]), with_times(by_mode["bk"], [573, 1559, 1439]),
                with_times(by_mode["opacus_hooks"], [800, 810, 790])]
    text = summary_text(unsteady, settings)
    bk = time_row(text, "bk")
    assert "1439.00" in bk and "573.00-1559.00" in bk and "69%" in bk, bk  # median, min-max, spread
    assert re.search(r" 1\.87\? ", bk), bk  # 1439 / 768, flagged
    assert re.search(r" 1\.04\? ", time_row(text, "opacus_hooks"))  # steady itself, but nondp is not
    assert "?: 2 time ratio(s)" in text and "10%" in text

    steady = [with_times(by_mode["nondp"], [100, 104, 98]), with_times(by_mode["bk"], [200, 195, 210])]
    text = summary_text(steady, settings)
    assert re.search(r" 2\.00  ", time_row(text, "bk")) and "?:" not in text
    assert "ms/step" in text and "min-max" in text and "spread" in text


def test_plots_leave_no_bar_cut_and_tell_coinciding_lines_apart(tiny_run, monkeypatch, tmp_path):
    """Every bar (with its error bar) ends below the top of its axis; every mode has its own marker and
    colour, and two modes with identical memory (forced here) are still drawn apart on the timeline."""
    from dpkernels.profiling import plots

    _, run_dir = tiny_run
    records = records_of(run_dir)
    twin = copy.deepcopy(next(r for r in records if r["config"]["mode"] == "bk"))
    twin["config"]["mode"] = "flash_bk"  # the same snapshots as bk: coinciding lines
    records.append(twin)
    figures = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, legend_space=0.0: figures.__setitem__(path.name, fig))
    plots.write_plots(records, tmp_path)
    for name in ("memory_breakdown.png", "overhead.png"):
        for ax in figures[name].axes:
            bars = [patch for patch in ax.patches]
            assert bars, name
            assert max(b.get_y() + b.get_height() for b in bars) < ax.get_ylim()[1], f"{name}: a bar reaches the axis top"
            for line in ax.lines:  # error bars
                assert max(line.get_ydata(), default=0) < ax.get_ylim()[1]
    for name in ("memory_timeline.png", "seq_scaling.png"):
        ax = figures[name].axes[0]
        lines = {line.get_label(): line for line in ax.lines}
        assert len({(line.get_marker(), line.get_color()) for line in lines.values()}) == len(lines) == 4, name
    timeline = {line.get_label(): line for line in figures["memory_timeline.png"].axes[0].lines}
    assert list(timeline["bk"].get_ydata()) == list(timeline["flash_bk"].get_ydata())
    assert all(a != b for a, b in zip(timeline["bk"].get_xdata(), timeline["flash_bk"].get_xdata()))
    legend = figures["memory_timeline.png"].legends[0]
    assert all(t.get_fontsize() >= 9 for t in legend.get_texts())


def test_a_rerun_gets_a_new_folder(tmp_path):
    assert new_run_dir(tmp_path) != new_run_dir(tmp_path)


def test_llama_fsdp_preset_is_seed_004():
    """Llama-3-8B's shape classifying sequences, 2 GPUs x B=2, T 1024-4096, the FSDP2 modes vs nondp."""
    preset = experiments.PRESETS["llama-fsdp"]
    assert preset["models"] == ["llama3"] and preset["gpus"] == 2 and preset["batch"] == [2]
    assert preset["seq"] == [1024, 2048, 4096] and set(preset["modes"]) == {"nondp", "ghost_fsdp", "flash_fsdp", "flash_bk_fsdp"}


# ---- FSDP2: experiments over several processes (gloo on CPU) ----------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    argv = ["--models", "llama3", "--seq", "8", "--batch", "2", "--steps", "2", "--warmup", "0", "--no-plots",
            "--gpus", "2", "--modes", "nondp", "flash_bk_fsdp", "--device", "cpu", "--out", str(out)]
    code = main(argv)
    (run_dir,) = out.iterdir()
    return code, [json.loads(p.read_text()) for p in sorted(run_dir.glob("llama3_*.json"))]


def test_sharded_experiment_merges_its_ranks(sharded_run):
    """2 ranks x B=2: global batch 4; peak = the largest rank's; a step's time = the slowest rank's."""
    code, records = sharded_run
    assert code == 0
    assert [r["config"]["mode"] for r in records] == ["flash_bk_fsdp", "nondp"]
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert r["config"]["sharded"] and r["config"]["gpus"] == 2 and r["config"]["global_batch"] == 4
        assert len(r["rank_peak_memory_mb"]) == 2 and r["peak_memory_mb"] == max(r["rank_peak_memory_mb"]) > 0
        assert len(r["step_times_ms"]) == 2 and r["tokens_per_s"] == pytest.approx(4 * 8 / (r["avg_time_ms"] / 1e3))
        assert r["breakdown_rank"] == 0


def test_a_failing_rank_is_recorded_with_its_number(tmp_path):
    bad = spec("nondp", model="llama3", gpus=2)
    bad["mode"] = bad["experiment"] = "bk"  # a single-process mode cannot run sharded
    (record,) = run_matrix([bad], tmp_path, timeout=300)
    assert record["status"] == "failed" and record["error"].startswith("rank ") and "cannot run on a sharded model" in record["error"]


# ---- isolation -----------------------------------------------------------------------------------------


def test_a_failing_experiment_leaves_the_others_intact(tmp_path, monkeypatch):
    good, bad, crash = spec("nondp"), spec("nondp", T=9), spec("nondp", T=10)
    bad["mode"] = bad["experiment"] = "nosuch"  # the worker itself fails and says so
    real_command = launcher.worker_command

    def command(s, result):  # a worker that dies without writing anything
        return [sys.executable, "-c", "import sys; sys.exit(3)"] if s is crash else real_command(s, result)

    monkeypatch.setattr(launcher, "worker_command", command)
    stream = io.StringIO()
    records = run_matrix([good, bad, crash], tmp_path, timeout=300, progress=Progress(3, stream))
    assert [r["status"] for r in records] == ["ok", "failed", "failed"]
    assert "unknown mode" in records[1]["error"] and "exited with code 3" in records[2]["error"]
    on_disk = {json.loads(p.read_text())["experiment"]: json.loads(p.read_text())["status"] for p in tmp_path.glob("*.json")}
    assert on_disk == {good["experiment"]: "ok", "nosuch": "failed", crash["experiment"]: "failed"}
    assert stream.getvalue().count("\n") == 3 and "3/3" in stream.getvalue()


# ---- the breakdown adds up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", STEP_MODES)
def test_breakdown_adds_up_to_the_measured_total(mode):
    """At every snapshot the components add up to the tracker's total within TOLERANCE, and the
    step's breakdown (components + temporaries) adds up to its measured peak."""
    from dpkernels.profiling.breakdown import MB, step_breakdown

    trainer, meter, recorder = measure(spec(mode, model="gpt", T=16, B=3), torch.device("cpu"), 2, 1)
    for snap in recorder.snapshots:
        assert abs(snap["unattributed_mb"]) <= TOLERANCE * snap["total_mb"], snap
    b = step_breakdown(recorder.snapshots, meter.peak() / MB)
    assert abs(sum(b["components_mb"].values()) + b["temporaries_mb"] - b["peak_mb"]) <= TOLERANCE * b["peak_mb"]
    assert b["temporaries_mb"] >= 0


def test_breakdown_finds_what_each_algorithm_holds():
    """nondp: activations held by autograd after forward; Opacus hooks: B per-sample gradients after
    backward; bk: the cached (A, G) once the norms are known, with autograd's graph already freed."""
    def at(mode, phase):
        _, _, recorder = measure(spec(mode, model="gpt", T=16, B=3), torch.device("cpu"), 1, 1)
        return next(s for s in recorder.snapshots if s["phase"] == phase)["components_mb"]

    assert at("nondp", "after_forward")["autograd_activations"] > 0
    hooks = at("opacus_hooks", "after_backward")
    assert hooks["clipping_cache"] == pytest.approx(3 * hooks["parameters"], rel=0.01)
    bk = at("bk", "after_norm_pass")
    assert bk["clipping_cache"] > 0 and bk["autograd_activations"] == 0
