"""tools/benchmark.py: the pretrain benchmark on a tiny model (alone and against HF, which
runs in its own process), the loader benchmark on tiny records, the mcr benchmark, and
the command line every tool shares (tools/cli.py: config overrides, a user's mistake as
one line and exit status 2)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mimjax import host_memory
from mimjax.run_config import ConfigError
from tools import benchmark, cli
from tools.bench import loader, pretrain, train_step
from tools.bench import mcr as mcr_benchmark  # the tests name their MCR row `mcr`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = textwrap.dedent("""
    from configs.mae_vit_b16 import get_config as mae_config

    def get_config(arg=None):
        c = mae_config(arg)
        c.model.variant = "Ti/8"
        c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 64, 1, 4, 128
        c.model.decoder.width, c.model.decoder.depth, c.model.decoder.num_heads = 32, 1, 2
        c.model.image_size, c.model.scales = 32, [32]
        c.model.dtype = "float32"
        c.global_batch_size = 8
        return c
""")

# Fast settings: one warm-up step, two windows of two steps.
FAST = ["--steps", "2", "--windows", "2", "--warmup", "1", "--peak-tflops", "0.1"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny_mae.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def _check_common(r, *, batch, scales):
    assert r["benchmark"] == "pretrain"
    assert r["num_devices"] == 8 and r["mesh"]["data"] == 8
    assert r["batch"] == batch and r["scales"] == scales and r["image_size"] == scales[0]
    assert r["img_per_s"] > 0 and r["step_time_s"] > 0
    assert len(r["step_times_s"]) == 2
    assert r["img_per_s"] == pytest.approx(batch / r["step_time_s"])
    assert r["compile_s"] > 0 and 0 < r["params_m"] < 1
    assert r["xla_gflops_per_step"] > 0 and r["model_gflops_per_step"] > 0
    assert r["tflops_per_s"] > 0 and r["peak_tflops"] > 0
    assert 0 < r["mfu"] < 1 and 0 < r["model_mfu"] < 1
    assert r["loss"] == r["loss"]  # finite, not NaN
    memory = r["memory"]  # per device, XLA's analysis; no allocator figures on CPU
    assert memory["compiled_peak_bytes"] == (memory["compiled_temp_bytes"]
                                             + memory["compiled_argument_bytes"]) > 0
    assert memory["device_peak_bytes"] is None


def test_pretrain_cli_multiscale(tiny_config, tmp_path):
    """As a subprocess (the __main__ path): a two-scale config, --image-size rescaling
    the scales, config overrides, the table, JSON on the last stdout line and in --json."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "pretrain",
           "--config", tiny_config, "--image-size", "32", "--batch", "16",
           "--config.model.scales=[16, 32]", "--config.model.image_size", "16",
           "--config.objectives.masked_reconstruction.scale_weights=[1.0, 0.5]",
           "--config.model.class_token=false", "--json", str(out),
           "--xla-option", "xla_cpu_enable_concurrency_optimized_scheduler=false", *FAST]
    env = dict(os.environ)  # inherits conftest's 8 simulated CPU devices
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert json.loads(out.read_text()) == r
    assert any(line.startswith("images / s") for line in lines)
    _check_common(r, batch=16, scales=[32, 64])
    assert r["peak_source"] == "--peak-tflops" and r["peak_tflops"] == pytest.approx(0.8)
    assert "hf" not in r and "speedup_vs_hf" not in r
    assert r["xla_options"] == {"xla_cpu_enable_concurrency_optimized_scheduler": False}
    assert set(r["model_gflops_per_image_fwd"]) == {"encoder", "decoder_32", "decoder_64"}


def test_pretrain_compare_hf(tiny_config, capsys):
    """In process, against HF ViTMAEForPreTraining built to the same sizes."""
    pytest.importorskip("transformers")
    r = benchmark.run(["pretrain", "--config", tiny_config, "--image-size", "32",
                       "--compare", "hf", *FAST])
    _check_common(r, batch=8, scales=[32])
    hf = r["hf"]
    assert hf["img_per_s"] > 0 and len(hf["step_times_s"]) == 2
    # Same trainable parameters (HF's frozen sin-cos tables excluded) and FLOP count.
    assert hf["params_m"] == pytest.approx(r["params_m"])
    assert hf["model_gflops_per_step"] == pytest.approx(r["model_gflops_per_step"])
    assert r["speedup_vs_hf"] == pytest.approx(r["img_per_s"] / hf["img_per_s"])
    assert "note" not in hf  # one scale: like for like
    for row in (r, hf):  # each process's own system time and page faults, per window
        assert row["sys_s_per_step"] >= 0 and row["minor_faults_per_step"] >= 0
        assert len(row["minor_faults_per_step_windows"]) == 2
        assert row["major_faults_per_step"] >= 0
    assert r["allocator"]["allocator"] == "auto" and r["allocator"]["reference_env"] == {}
    assert r["allocator"]["reference"] == "C library default"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["speedup_vs_hf"] == r["speedup_vs_hf"]


def test_allocator_option(tiny_config, monkeypatch):
    """--allocator: a library that is not there, or a setting a process takes only at its
    start asked of a running process, is one line saying what to do."""
    from tools.bench import timing

    base = ["pretrain", "--config", tiny_config, *FAST]
    monkeypatch.setattr(timing, "_LIBRARY_DIRS", ())
    monkeypatch.setattr(sys, "prefix", "/nonexistent")
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(cli.UsageError, match="--allocator jemalloc: no libjemalloc.so found"):
        benchmark.run([*base, "--allocator", "jemalloc"])
    with pytest.raises(cli.UsageError, match="expected one of auto, system"):
        benchmark.run([*base, "--allocator", "glibc"])
    with pytest.raises(cli.UsageError, match="glibc.malloc.hugetlb=1 from the start"):
        benchmark.run([*base, "--allocator", "hugetlb"])
    monkeypatch.setenv(host_memory.ENV, "auto")  # restored after the test
    info = timing.prepare_allocator("retain", program=False)  # mallopt here, tunables there
    assert info["reference_env"] == {"GLIBC_TUNABLES": host_memory.TUNABLES}
    assert info["reference"] == f"GLIBC_TUNABLES={host_memory.TUNABLES}"


def test_windows_record_page_faults_and_system_time():
    from tools.bench import timing

    class Touch(timing.Timed):
        name = "touch"

        def run(self, n):
            for _ in range(n):
                bytearray(8 << 20)  # fresh pages: minor faults
            return 1.0

    times = timing.time_interleaved([Touch()], warmup=0, steps=2, windows=2, log=lambda m: None)
    row = timing.summarize(times["touch"], batch=1, cores=1)
    assert row["minor_faults_per_step"] > 0 and len(row["minor_faults_per_step_windows"]) == 2
    assert row["sys_s_per_step"] >= 0 and row["major_faults_per_step"] >= 0


def test_model_flops_count():
    """The analytic count: ViT-B/16 encoder on 49 + 1 tokens, 8x512 decoder on 197."""
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(
        variant="B/16", image_size=224, scales=[224], channels=3, dtype="float32",
        decoder=dict(width=512, depth=8, num_heads=16, mlp_dim=None)))
    counts = pretrain.model_flops_per_image(cfg, mask_ratio=0.75)
    enc = 2 * 49 * 768 * 768 + 12 * (2 * 50 * (4 * 768**2 + 2 * 768 * 3072) + 4 * 50**2 * 768)
    assert counts["encoder"] == enc
    dec = (2 * 50 * 768 * 512 + 8 * (2 * 197 * (4 * 512**2 + 2 * 512 * 2048) + 4 * 197**2 * 512)
           + 2 * 196 * 512 * 768)
    assert counts["decoders"] == {224: dec}
    assert counts["forward"] == enc + dec


def test_config_overrides_and_errors(tiny_config, capsys):
    config = cli.load_config(tiny_config, [
        ("model.depth", "3"), ("model.scan", "true"), ("optimizer.base_lr", "1"),
        ("model.scales", "[32, 64]"), ("model.attention", "fused")])
    assert config.model.image_size == 32
    assert config.model.depth == 3 and config.model.scan is True
    assert config.optimizer.base_lr == 1.0 and isinstance(config.optimizer.base_lr, float)
    assert list(config.model.scales) == [32, 64] and config.model.attention == "fused"
    pretrain.set_image_size(config, 48)
    assert config.model.image_size == 48 and list(config.model.scales) == [48, 96]
    with pytest.raises(ConfigError, match="no field"):
        cli.load_config(tiny_config, [("model.nope", "1")])
    parser = benchmark.build_parser()
    with pytest.raises(SystemExit) as stop:  # argparse: usage and "unrecognized arguments"
        cli.parse_args(parser, ["loader", "--steps2"])
    assert stop.value.code == 2 and "unrecognized arguments: --steps2" in capsys.readouterr().err
    args, overrides = cli.parse_args(parser, ["loader", "--config.a.b", "2", "--config.c=x"])
    assert args.command == "loader" and overrides == [("a.b", "2"), ("c", "x")]
    assert train_step.parse_xla_options(["a=true", "b=3", "c=dot,eltwise"]) == {
        "a": True, "b": 3, "c": "dot,eltwise"}


def test_config_overrides_reach_the_benchmark(tiny_config, capsys):
    """`--config.KEY=VALUE` on the command line sets the benchmarked config (after the
    file, before --image-size and --batch); an unknown field stops the tool with one
    line naming the closest fields, exit status 2, before anything is built."""
    args, overrides = cli.parse_args(benchmark.build_parser(), [
        "pretrain", "--config", tiny_config, "--config.model.depth=2", "--batch", "16",
        "--config.model.scales", "[32, 64]", "--image-size", "16"])
    config = pretrain.build_config(args.config, overrides, args.image_size, args.batch)
    assert config.model.depth == 2 and config.global_batch_size == 16
    assert config.model.image_size == 16 and list(config.model.scales) == [16, 32]

    code = benchmark.main(["pretrain", "--config", tiny_config, "--config.model.dept=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: config.model has no field 'dept'; did you mean ")
    assert "config.model.depth" in err


def test_cli_maps_a_users_mistake_to_one_line(capsys):
    """cli.run: UsageError, ConfigError and the tool's own user errors print `error: ...`
    (one line, no traceback) and give exit status 2; anything else is a bug and raises."""
    def fails(error):
        def body():
            raise error
        return body

    for error in (cli.UsageError("--size 0: must be >= 1"),
                  ConfigError("config.model has no field 'x'"),
                  FileNotFoundError("no checkpoint in /tmp/w")):
        assert cli.run(fails(error), user_errors=(FileNotFoundError,)) == 2
        err = capsys.readouterr().err
        assert err == f"error: {error}\n" and "Traceback" not in err
    assert cli.run(fails(cli.UsageError("two\nlines"))) == 2
    assert capsys.readouterr().err == "error: two lines\n"
    with pytest.raises(FileNotFoundError):  # not declared by this tool: a bug, with traceback
        cli.run(fails(FileNotFoundError("x")))
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 1) == 1


def test_cli_overrides_apply_to_a_workdirs_config(tmp_path):
    """Tools whose --config is optional (export, retrieval eval): without --config the
    overrides apply to the run's WORKDIR/config.json; with neither, None."""
    (tmp_path / "config.json").write_text(json.dumps({"model": {"depth": 2, "name": "mae"}}))
    assert cli.load_config(None, [], workdir=str(tmp_path)) is None
    config = cli.load_config(None, [("model.depth", "4")], workdir=str(tmp_path))
    assert config.model.depth == 4 and config.model.name == "mae"
    with pytest.raises(ConfigError, match="did you mean config.model.depth"):
        cli.load_config(None, [("model.deph", "4")], workdir=str(tmp_path))
    with pytest.raises(cli.UsageError, match="need --config"):
        cli.load_config(None, [("model.depth", "4")])


def test_user_error_as_a_program():
    """The __main__ path: exit status 2 and one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                           "loader", "--data", os.path.join(ROOT, "no_such_shards")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: --data ") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""


def test_help():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                           "pretrain", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--compare" in proc.stdout and "--image-size" in proc.stdout
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                           "mcr", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "two-stream" in proc.stdout and "--batch" in proc.stdout


@pytest.mark.parametrize("tool", ["benchmark", "export_pytorch", "import_pytorch",
                                  "evaluate_retrieval", "prepare_data"])
def test_every_tool_helps_without_importing_jax(tool):
    """`python tools/NAME.py --help` documents the tool and stays fast: JAX (seconds to
    import) is only imported after the arguments are parsed."""
    script = os.path.join(ROOT, "tools", f"{tool}.py")
    code = ("import contextlib, io, runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "with contextlib.suppress(SystemExit), "
            "contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "print('usage:' in out.getvalue(), 'jax' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.stdout.split() == ["True", "False"], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """24 records of 64x64 12-bit uint16 noise in 2 shards."""
    import numpy as np

    from input_pipeline import records

    rng = np.random.default_rng(0)
    recs = [(rng.integers(0, 4096, (64, 64)).astype(np.uint16), {"bits_stored": 12})
            for _ in range(24)]
    out = tmp_path_factory.mktemp("shards")
    records.write_shards(recs, str(out), "tiny", 2)
    return str(out)


def test_loader_cli_sweep(tiny_shards, tmp_path):
    """As a subprocess: a 1..2 worker sweep of every stage and of the grain pipeline on
    tiny records, the table, JSON on the last stdout line and in --json."""
    out = tmp_path / "loader.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "loader",
           "--data", tiny_shards, "--workers", "2", "--sweep", "--size", "32",
           "--batch", "4", "--seconds", "0.3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert json.loads(out.read_text()) == r
    assert any(line.startswith("pipeline (grain)") for line in lines)
    assert r["benchmark"] == "loader" and r["num_records"] == 24 and r["num_shards"] == 2
    assert r["image_shape"] == [64, 64] and r["dtype"] == "uint16" and r["bits_stored"] == 12
    assert r["compression"] == "uncompressed" and r["size"] == 32 and r["hflip"] is True
    assert r["crop_scale"] == [0.2, 1.0]
    assert [run["workers"] for run in r["runs"]] == [1, 2] and r["workers"] == 2
    for run in r["runs"]:
        n = run["workers"]
        for name in loader.STAGES:
            m = run["stages"][name]
            assert len(m["per_process"]) == n and min(m["per_process"]) > 0
            assert m["total"] == pytest.approx(sum(m["per_process"]))
            assert m["per_worker"] == pytest.approx(m["total"] / n)
            assert m["per_worker_cpu_s"] > 0
        p = run["pipeline"]
        assert p["batches"] > 0 and p["total"] > 0
        assert p["total"] == pytest.approx(p["batches"] * 4 / p["wall_s"])
        assert p["per_worker"] == pytest.approx(p["total"] / n)
    first, second = r["runs"]
    assert first["pipeline"]["scaling"] == pytest.approx(1.0)
    assert second["pipeline"]["scaling"] == pytest.approx(
        second["pipeline"]["total"] / (2 * first["pipeline"]["total"]))
    assert r["records_per_s_per_worker"] == second["pipeline"]["per_worker"]
    assert r["meets_target"] == (max(r["records_per_s_per_worker"],
                                     r["records_per_worker_cpu_s"] or 0) >= 1000)


def test_loader_errors(tiny_shards, tmp_path):
    with pytest.raises(cli.UsageError, match="--data"):
        benchmark.run(["loader", "--data", str(tmp_path / "missing")])
    with pytest.raises(cli.UsageError, match="exceeds"):
        benchmark.run(["loader", "--data", tiny_shards, "--size", "128"])
    with pytest.raises(cli.UsageError, match="cannot fill --batch"):
        benchmark.run(["loader", "--data", tiny_shards, "--size", "32", "--batch", "64"])
    with pytest.raises(cli.UsageError, match="--workers must be >= 1"):
        benchmark.run(["loader", "--data", tiny_shards, "--workers", "0"])


def test_loader_record_stage_is_what_the_pipeline_batches(tiny_shards):
    """The "record" stage times pipeline.make_record_dataset: its element n is row n of
    the pretraining batches (same decode, shuffle and augmentation, across epochs)."""
    import numpy as np

    from input_pipeline import pipeline

    cfg = loader.data_config(tiny_shards)
    stream = pipeline.make_record_dataset(cfg, scales=(32,), seed=5)
    it = iter(pipeline.make_pretrain_dataset(cfg, scales=(32,), global_batch_size=8, seed=5))
    for b in range(4):  # 32 records: one epoch and a third
        batch = next(it)
        for row in range(8):
            element = stream[8 * b + row]
            assert element["index"] == batch["index"][row]
            np.testing.assert_array_equal(element["image_32"], batch["image_32"][row])
    it.close()


# ----------------------------------------------------------------------------- mcr
MCR_TINY = [os.path.join(ROOT, "configs", "mcr_demo.py") + ":tiny", "--config.model.depth=1",
            "--config.model.text.max_length=24", "--config.data.max_text_length=24"]
# Three models to compile: skip the slow LLVM passes (XLA's FLOP and memory analyses
# are of the optimised HLO, before them).
FAST_COMPILE = ["--xla-option", "xla_backend_optimization_level=0",
                "--xla-option", "xla_llvm_disable_expensive_passes=true"]


@pytest.mark.slow  # three train states and steps to build: ~30 s on 2 cores
def test_mcr_three_rows_and_json(tmp_path, capsys):
    """MCR, its CLIP baseline and the two-stream variant timed in one run: the table's
    three columns and two ratio columns, the JSON keys, and what the compiled steps must
    show (the unmasked contrastive pass costs FLOPs and memory; CLIP has no decoder and
    no MLM head)."""
    out = tmp_path / "mcr.json"
    r = benchmark.run(["mcr", "--config", *MCR_TINY, "--batch", "16", "--steps", "2",
                       "--windows", "1", "--warmup", "1", "--json", str(out), *FAST_COMPILE])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == r == json.loads(out.read_text())
    header = next(line for line in printed if "MCR/CLIP" in line).split()
    assert header == ["MCR", "CLIP", "two-stream", "MCR/CLIP", "MCR/two-stream"]
    assert any(line.startswith("pairs / s") for line in printed)

    assert r["benchmark"] == "mcr" and r["batch"] == 16 and r["num_devices"] == 8
    assert (r["image_size"], r["text_length"], r["vocab_size"]) == (32, 24, 256)
    assert r["peak_source"] == "config peak_tflops_per_device"
    rows = r["variants"]
    assert list(rows) == ["mcr", "clip", "two_stream"]
    for row in rows.values():
        assert len(row["step_times_s"]) == 1 and row["step_time_s"] > 0
        assert row["pairs_per_s"] == pytest.approx(16 / row["step_time_s"])
        assert row["xla_gflops_per_step"] > 0 and row["tflops_per_s"] > 0 and row["mfu"] > 0
        memory = row["memory"]
        assert memory["compiled_peak_bytes"] == (memory["compiled_temp_bytes"]
                                                 + memory["compiled_argument_bytes"]) > 0
        assert memory["device_peak_bytes"] is None  # the CPU allocator reports none
        assert row["loss"] == row["loss"]  # finite, not NaN
    mcr, clip, two = rows["mcr"], rows["clip"], rows["two_stream"]
    assert (mcr["image_mask_ratio"], mcr["text_mask_ratio"], mcr["itc_inputs"]) == (
        0.5, 0.25, "masked")
    assert (clip["image_mask_ratio"], clip["text_mask_ratio"], clip["mim_weight"],
            clip["mlm_weight"], clip["decoder"], clip["mlm_head"], clip["pooling"]) == (
        0.0, 0.0, 0.0, 0.0, False, False, "cls")
    assert two["itc_inputs"] == "unmasked" and two["params_m"] == mcr["params_m"]
    assert clip["params_m"] < mcr["params_m"]
    # The second (unmasked) pass of the two-stream design: more FLOPs and temporaries.
    assert two["xla_gflops_per_step"] > 1.3 * mcr["xla_gflops_per_step"]
    assert two["memory"]["compiled_temp_bytes"] > mcr["memory"]["compiled_temp_bytes"]
    for other in ("clip", "two_stream"):
        ratios = r["ratios"][f"mcr_over_{other}"]
        assert set(ratios) == set(mcr_benchmark.RATIO_KEYS)
        assert ratios["pairs_per_s"] == pytest.approx(
            mcr["pairs_per_s"] / rows[other]["pairs_per_s"])
        assert ratios["compiled_peak_bytes"] == pytest.approx(
            mcr["memory"]["compiled_peak_bytes"] / rows[other]["memory"]["compiled_peak_bytes"])
        assert ratios["device_peak_bytes"] is None


def test_mcr_synthetic_batch_contract_and_errors():
    import numpy as np

    config = cli.load_config(MCR_TINY[0], [("model.text.max_length", "24"),
                                           ("data.max_text_length", "24")])
    b = mcr_benchmark.synthetic_pairs_batch(config, 32, np.random.default_rng(0), first_index=5)
    assert b["image"].shape == (32, 32, 32, 1) and b["image"].dtype == np.float32
    ids, mask = b["text_ids"], b["text_mask"]
    assert ids.shape == mask.shape == (32, 24) and ids.dtype == mask.dtype == np.int32
    lengths = mask.sum(1)
    assert (ids[:, 0] == 2).all() and 12 <= lengths.min() and lengths.max() <= 24
    assert len(set(lengths.tolist())) > 1  # report lengths vary
    for row, n in zip(ids, lengths):
        assert row[n - 1] == 3 and (row[n:] == 0).all() and (row[1:n - 1] >= 5).all()
    np.testing.assert_array_equal(mask, (ids != 0).astype(np.int32))
    np.testing.assert_array_equal(b["pair_index"], np.arange(5, 37))
    with pytest.raises(cli.UsageError, match="not an MCR setting"):
        benchmark.run(["mcr", "--config", MCR_TINY[0].replace(":tiny", ":tiny_clip")])
    with pytest.raises(cli.UsageError, match="image-text config"):
        benchmark.run(["mcr", "--config", os.path.join(ROOT, "configs", "demo.py")])


# ----------------------------------------------------------------------------- segmentation
SEG_TINY = os.path.join(ROOT, "configs", "segment_acdc.py") + ":tiny"
# The tiny encoder at patch 16 (instead of --compare's default ViT-S/16) and UNETR's
# decoder at feature_size 4 keep the aligned (12-block) model small.
SEG_SMALL_UNETR = ["--config.model.variant=Ti/16", "--image-size", "32", "--batch", "8",
                   "--config.model.decoder_widths=(32, 16, 8, 4)", "--config.model.scan=true"]


def _check_segmentation(r, *, batch):
    assert r["benchmark"] == "segmentation" and r["num_devices"] == 8 and r["batch"] == batch
    assert r["img_per_s"] > 0 and len(r["step_times_s"]) == 2
    assert r["img_per_s"] == pytest.approx(batch / r["step_time_s"])
    assert r["compile_s"] > 0 and r["xla_gflops_per_step"] > 0 and 0 < r["mfu"] < 1
    assert r["loss"] == r["loss"]  # finite, not NaN
    memory = r["memory"]
    assert memory["compiled_peak_bytes"] == (memory["compiled_temp_bytes"]
                                             + memory["compiled_argument_bytes"]) > 0


@pytest.mark.slow  # the trainer's jitted init and the step to compile: ~25 s on 2 cores
def test_segmentation_alone(tmp_path, capsys):
    """The config's own model and objective (progressive decoder, pseudo-labels and
    HierarchicalMix on), the table and the JSON; no model FLOP count for that decoder."""
    out = tmp_path / "seg.json"
    r = benchmark.run(["segmentation", "--config", SEG_TINY, "--json", str(out), *FAST,
                       *FAST_COMPILE])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == r == json.loads(out.read_text())
    assert any(line.startswith("images / s") for line in printed)
    _check_segmentation(r, batch=8)
    assert (r["variant"], r["decoder"], r["image_size"]) == ("Ti/8", "progressive", 32)
    assert r["pseudo_labels"] and r["hierarchical_mix"] and r["aligned_for_monai"] == []
    assert r["model_gflops_per_step"] is None and r["model_mfu"] is None
    assert "monai" not in r and "speedup_vs_monai" not in r


@pytest.mark.slow  # a 12-block ViT to compile and MONAI's UNETR in a spawned process: ~60 s
def test_segmentation_compare_monai(capsys):
    """Against MONAI's UNETR at the aligned sizes: both sides ran in alternating windows,
    the ratio, parameter counts that differ by mimjax's head only, and model FLOPs that
    torch's own count confirms."""
    pytest.importorskip("monai", reason="--compare monai needs MONAI")
    r = benchmark.run(["segmentation", "--config", SEG_TINY, "--compare", "monai",
                       *SEG_SMALL_UNETR, *FAST, *FAST_COMPILE])
    _check_segmentation(r, batch=8)
    assert (r["variant"], r["decoder"]) == ("Ti/16", "unetr")
    assert not r["pseudo_labels"] and not r["hierarchical_mix"]
    assert "model.depth: 2 -> 12" in r["aligned_for_monai"]
    monai = r["monai"]
    assert monai["img_per_s"] > 0 and len(monai["step_times_s"]) == 2
    assert monai["loss"] == monai["loss"] and monai["threads"] == r["cpu_threads"]
    assert r["speedup_vs_monai"] == pytest.approx(r["img_per_s"] / monai["img_per_s"])
    settings = monai["settings"]
    assert (settings["hidden_size"], settings["num_heads"], settings["mlp_dim"]) == (64, 4, 128)
    assert (settings["feature_size"], settings["out_channels"], settings["spatial_dims"]) == (
        4, 6, 2)
    f = 4
    assert round(1e6 * (r["params_m"] - monai["params_m"])) == 9 * f * f + 3 * f
    assert 0.9 < monai["torch_counted_gflops_per_step"] / monai["model_gflops_per_step"] <= 1.0
    assert 0 < r["model_mfu"] < 1 and 0 < monai["model_mfu"] < 1
    assert r["versions"]["monai"] and r["versions"]["torch"]
    printed = capsys.readouterr().out
    assert "speedup vs MONAI UNETR" in printed and "MONAI UNETR" in printed.splitlines()[2]


def test_segmentation_unetr_alignment():
    """The aligned config and MONAI's UNETR built from it: parameter counts differ by the
    head only, the forward FLOP formula equals torch's count exactly, and settings UNETR
    cannot express are refused."""
    pytest.importorskip("monai", reason="the UNETR side needs MONAI")
    import jax
    import torch
    from monai.networks.nets import UNETR
    from torch.utils.flop_counter import FlopCounterMode

    from mimjax.models.spec import ModelSpec
    from tools.bench import segmentation

    overrides = [("model.width", "96"), ("model.num_heads", "3"), ("model.mlp_dim", "200")]
    config, changes = segmentation.build_config(SEG_TINY, overrides, 64, None, None, "monai")
    # --compare's default ViT-S/16; the command line's own width, heads and MLP win.
    assert config.model.variant == "S/16" and config.model.taps == (4, 7, 10, 12)
    assert (config.model.width, config.model.depth, config.model.num_heads) == (96, 12, 3)
    assert "model.posemb: 'sincos2d' -> 'learn'" in changes
    assert config.model.image_size == config.data.image_size == 64
    assert config.global_batch_size == 8
    default, changes = segmentation.build_config(SEG_TINY, [("global_batch_size", "16")],
                                                 None, None, None, "monai")
    assert (default.model.image_size, default.global_batch_size) == (128, 16)
    assert (default.model.width, default.model.num_heads, default.model.mlp_dim) == (
        384, 6, 1536)  # ViT-S's, not the tiny config's
    assert not any(c.startswith(("model.width", "model.depth")) for c in changes)
    spec = ModelSpec.from_config(config.model)
    mimjax_params = sum(x.size for x in jax.tree.leaves(spec.abstract_params))
    unetr = UNETR(**segmentation.unetr_kwargs(config))
    monai_params = sum(p.numel() for name, p in unetr.named_parameters()
                       if "norm_cross_attn" not in name)  # never called by UNETR
    assert mimjax_params - monai_params == 9 * 16**2 + 3 * 16  # decoder widths f = 16
    with FlopCounterMode(display=False) as counter:
        unetr(torch.randn(2, 1, 64, 64))
    assert counter.get_total_flops() == 2 * segmentation.unetr_forward_flops(
        config, "monai")["forward"]

    for extra, message in ((("model.backbone", "'unet'"), "ViT backbone"),
                           (("model.decoder_widths", "(64, 32, 16, 4)"), r"\(8f, 4f, 2f, f\)"),
                           (("model.norm", "'layer'"), "batch or instance")):
        with pytest.raises(cli.UsageError, match=message):
            segmentation.build_config(SEG_TINY, [extra], None, None, None, "monai")
    with pytest.raises(cli.UsageError, match="segmentation config"):
        benchmark.run(["segmentation", "--config", os.path.join(ROOT, "configs", "demo.py")])


def test_segmentation_up_conv_is_flax_conv_transpose():
    """conv_blocks.up_conv computes the 2x2 stride-2 transposed convolution as a matmul
    (XLA:CPU's kernel gradient of the convolution form made it a third of the
    benchmarked step): the same parameters as nnx.ConvTranspose, and the same outputs
    and gradients up to float32 rounding."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mimjax.models import conv_blocks

    for cin, cout, use_bias in ((3, 5, True), (96, 32, False)):
        ours = conv_blocks.up_conv(cin, cout, use_bias=use_bias, dtype=jnp.float32,
                                   rngs=nnx.Rngs(0))
        flax_form = nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2), padding="VALID",
                                      use_bias=use_bias, kernel_init=conv_blocks.HE_NORMAL,
                                      rngs=nnx.Rngs(0))
        assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(
            jnp.shape, nnx.state(flax_form))
        if use_bias:  # a non-zero bias, shared
            ours.bias[...] = flax_form.bias[...] = jnp.linspace(-1.0, 1.0, cout)
        np.testing.assert_array_equal(ours.kernel[...], flax_form.kernel[...])
        x = jax.random.normal(jax.random.key(1), (2, 5, 7, cin))
        np.testing.assert_allclose(ours(x), flax_form(x), atol=1e-5, rtol=1e-5)

        def loss(module, x):
            return jnp.sum(jnp.sin(module(x)))

        (g_ours, dx_ours), (g_flax, dx_flax) = (
            nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, flax_form))
        np.testing.assert_allclose(dx_ours, dx_flax, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(g_ours["kernel"][...], g_flax["kernel"][...], atol=1e-4,
                                   rtol=1e-5)


# ----------------------------------------------------------------------------- landmarks
LM_TINY = os.path.join(ROOT, "configs", "landmarks_hand.py") + ":tiny"


@pytest.mark.slow  # two jitted inits and steps to build: ~55 s on 2 shared cores
def test_landmarks_compare_unet(tmp_path, capsys):
    """The tiny ViT landmark step against the same config's U-Net in alternating
    windows: both rows, the ratio, the table and the JSON (stdout's last line, --json)."""
    out = tmp_path / "landmarks.json"
    r = benchmark.run(["landmarks", "--config", LM_TINY, "--compare", "unet", "--batch", "8",
                       "--steps", "1", "--windows", "1", "--warmup", "1",
                       "--peak-tflops", "0.1", "--json", str(out), *FAST_COMPILE])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == r == json.loads(out.read_text())
    assert printed[2].split() == ["ViT", "U-Net"]
    assert any(line.startswith("speedup vs U-Net") for line in printed)
    assert r["benchmark"] == "landmarks" and r["num_devices"] == 8 and r["batch"] == 8
    assert (r["image_size"], r["num_landmarks"], r["sigma"], r["loss_type"]) == (
        32, 37, 1.5, "bce")
    unet = r["unet"]
    assert (r["backbone"], r["variant"], r["decoder"], r["layer_decay"]) == (
        "vit", "Ti/16", "progressive", 0.75)
    assert (unet["backbone"], unet["variant"], unet["layer_decay"]) == ("unet", None, None)
    assert unet["changes"] == ["model.backbone: 'vit' -> 'unet'",
                               "optimizer.layer_decay: 0.75 -> None"]
    for row in (r, unet):
        assert len(row["step_times_s"]) == 1 and row["img_per_s"] > 0
        assert row["img_per_s"] == pytest.approx(8 / row["step_time_s"])
        assert row["loss"] == row["loss"] and abs(row["loss"]) < float("inf")  # finite
        assert row["params_m"] > 0 and row["compile_s"] > 0
        assert row["xla_gflops_per_step"] > 0 and 0 < row["mfu"] < 1
        memory = row["memory"]
        assert memory["compiled_peak_bytes"] == (memory["compiled_temp_bytes"]
                                                 + memory["compiled_argument_bytes"]) > 0
    assert r["speedup_vs_unet"] == pytest.approx(r["img_per_s"] / unet["img_per_s"])
    assert r["peak_source"] == "--peak-tflops"


def test_landmarks_synthetic_batch_and_errors():
    """The pipeline's format (input_pipeline.landmarks.LandmarkAugment) with every point
    inside the margins; a config of another task, and --compare unet on a U-Net, refused."""
    import numpy as np

    from tools.bench import landmark

    config = landmark.build_config(LM_TINY, [], None, 8, None)
    b = landmark.synthetic_batch(config, 8, np.random.default_rng(0), first_row=8)
    assert set(b) == {"image", "landmarks", "landmark_valid", "index"}
    assert b["image"].shape == (8, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["landmarks"].shape == (8, 37, 2) and b["landmarks"].dtype == np.float32
    assert 4 <= b["landmarks"].min() and b["landmarks"].max() <= 32 - 5
    assert b["landmark_valid"].dtype == bool and b["landmark_valid"].all()
    np.testing.assert_array_equal(b["index"], np.arange(8, 16, dtype=np.int32))
    with pytest.raises(cli.UsageError, match="needs a landmarks config"):
        benchmark.run(["landmarks", "--config", os.path.join(ROOT, "configs", "demo.py")])
    unet = landmark.build_config(LM_TINY, [("model.backbone", "unet")], None, None, None)
    with pytest.raises(cli.UsageError, match="compares the ViT backbone"):
        landmark.unet_config(unet)
