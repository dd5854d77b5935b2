"""The runner end to end: records, recomputation, resume after SIGKILL/SIGTERM, determinism,
no-op reruns and the sanity alarms — real runs of a tiny timm ViT on replica-layout fixtures."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import make_waterbirds
from processes import HANG_S, freeze_when, reaped
from tiny_models import register_tiny_vit, save_tiny_weights

from robustbench_fvae import records
from robustbench_fvae.config import AdapterConfig, RunConfig, TrainConfig
from robustbench_fvae.run import main as run_main
from robustbench_fvae.training import CHECKPOINT_FILE, WEIGHTS_FILE, load_trained_model, run

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# A larger fixture than the default so a run has enough steps to be killed in the middle.
COUNTS = {"train": {0: 14, 1: 4, 2: 4, 3: 10}, "val": {0: 3, 1: 3, 2: 3, 3: 3},
          "test": {0: 3, 1: 3, 2: 3, 3: 3}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("runner")
    make_waterbirds(base / "data" / "synth", counts=COUNTS, synthetic_name="synth-waterbirds")
    weights = save_tiny_weights(base / "tiny.safetensors")
    zero = save_tiny_weights(base / "zero.safetensors", zero=True)
    return {"base": base, "data": base / "data", "weights": weights, "zero": zero,
            "name": register_tiny_vit()}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(env, out: Path, method: str = "fvae", **train) -> RunConfig:
    settings = dict(epochs=3, batch_size=4, eval_batch_size=16, seed=0, patience=0)
    settings.update(train)
    return RunConfig(method=method, dataset="synth-waterbirds", data_root=str(env["data"]),
                     out=str(out), backbone=env["name"], weights=str(env["weights"]),
                     device="cpu", num_workers=0, adapter=AdapterConfig(rank=4),
                     train=TrainConfig(**settings))


def quiet(_msg: str) -> None:
    pass


def cli_args(cfg: RunConfig, *extra: str) -> list[str]:
    t = cfg.train
    return ["--method", cfg.method, "--dataset", cfg.dataset, "--data-root", cfg.data_root,
            "--out", cfg.out, "--backbone", cfg.backbone, "--weights", cfg.weights,
            "--device", "cpu", "--num-workers", "0", "--rank", "4", "--epochs", str(t.epochs),
            "--batch-size", str(t.batch_size), "--eval-batch-size", str(t.eval_batch_size),
            "--seed", str(t.seed), "--patience", str(t.patience), "--no-progress", *extra]


def launch(args: list[str], **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}", RBF_TEST_THREADS="1",
               HF_HUB_OFFLINE="1", **extra_env)
    code = f"import sys, tiny_models; sys.exit(tiny_models.main({args!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def same_metrics(a: dict, b: dict) -> None:
    for split in ("val", "test"):
        assert a[split] == b[split], split
    assert a["selected_epoch"] == b["selected_epoch"]


# ---------------------------------------------------------------- the record


def test_record_is_complete_and_metrics_recompute_from_predictions(env, tmp_path):
    result = run(tiny_cfg(env, tmp_path), progress=False, log=quiet)
    rdir = result.run_dir
    assert rdir.parent.parent.name == "synth-waterbirds" and rdir.parent.name == "fvae"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "history.jsonl", "metrics.json", "predictions_val.csv",
                 "predictions_test.csv", WEIGHTS_FILE, CHECKPOINT_FILE, "done"):
        assert (rdir / name).is_file(), name
    for name in ("config.json", "metrics.json", "predictions_test.csv", WEIGHTS_FILE):
        assert (rdir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not 0600
    metrics = records.read_json(rdir / "metrics.json")
    assert metrics["selection"] == "val_wg"
    assert set(metrics["params"]) >= {"trainable", "inference"}
    assert metrics["params"]["trainable"] > metrics["params"]["inference"] > 0
    history = records.read_history(rdir / "history.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epochs count from 1
    assert set(history[0]["train"]) >= {"ce", "R", "K1", "K2", "G"}
    best = max(history, key=lambda h: (h["val"]["worst_group_acc"], -h["epoch"]))
    assert metrics["selected_epoch"] == best["epoch"]
    recomputed = records.recompute_metrics(rdir)
    assert recomputed["val"] == metrics["val"]
    assert recomputed["test"] == metrics["test"]
    assert metrics["test"] == best["test"]
    config = records.read_json(rdir / "config.json")
    assert config["config"]["train"]["lr"] == 5e-3  # resolved default recorded
    assert config["environment"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        config["environment"]["versions"]["torch"] == torch.__version__
    # The selected weights reload into the same predictions.
    model, _, splits = load_trained_model(rdir)
    from robustbench_fvae.training import predict
    _, pred = predict(model, splits["test"], 16, 0, torch.device("cpu"))
    assert (pred == records.read_predictions(rdir / "predictions_test.csv")["pred"]).all()
    # A checkout that would rebuild a different replica (or backbone) refuses to load the
    # weights into it, naming both versions.
    config["config"]["replica_version"] = 1
    records.write_json_atomic(rdir / "config.json", config)
    with pytest.raises(records.RecordError, match="replica_version 1, but this checkout builds"):
        load_trained_model(rdir)


def test_same_seed_same_numbers_and_rerun_is_a_no_op(env, tmp_path, capsys):
    first = run(tiny_cfg(env, tmp_path / "a"), progress=False, log=quiet)
    second = run(tiny_cfg(env, tmp_path / "b"), progress=False, log=quiet)
    same_metrics(first.metrics, second.metrics)
    assert (first.run_dir / "predictions_test.csv").read_bytes() == \
        (second.run_dir / "predictions_test.csv").read_bytes()
    other_seed = run(tiny_cfg(env, tmp_path / "a", seed=1), progress=False, log=quiet)
    assert other_seed.run_dir != first.run_dir
    stamp = (first.run_dir / "done").stat().st_mtime_ns
    cfg = tiny_cfg(env, tmp_path / "a")
    assert run_main(cli_args(cfg)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("already done") and out[-1] == str(first.run_dir)
    assert (first.run_dir / "done").stat().st_mtime_ns == stamp
    assert run_main(cli_args(cfg, "--force")) == 0
    assert (first.run_dir / "done").stat().st_mtime_ns != stamp


@pytest.mark.parametrize("algorithm", ["groupdro", "resample", "reweight", "jtt"])
@pytest.mark.parametrize("method", ["lora", "fvae", "vae2lat", "bvae2lat", "full", "linear"])
def test_every_method_runs_with_every_algorithm(env, tmp_path, method, algorithm):
    extra = {"jtt_epochs": 1, "jtt_upweight": 3} if algorithm == "jtt" else {}
    cfg = tiny_cfg(env, tmp_path, method=method, epochs=1, algorithm=algorithm, **extra)
    result = run(cfg, progress=False, log=quiet)
    metrics = result.metrics
    assert metrics["algorithm"]["name"] == algorithm
    assert metrics["algorithm"]["group_labels_in_training"] == (
        None if algorithm == "jtt" else "train")
    (record,) = records.read_history(result.run_dir / "history.jsonl")
    assert "task" in record["train"] and math.isfinite(record["train"]["task"])
    if algorithm == "groupdro":
        q = record["algorithm"]["q"]
        assert len(q) == 4 and sum(q) == pytest.approx(1.0, abs=1e-5)
    if algorithm == "jtt":
        info = records.read_json(result.run_dir / "jtt_error_set.json")
        stage1 = records.load_run(info["stage1_run"])
        assert stage1.done and stage1.run_config.train.algorithm == "erm"
        assert stage1.run_config.train.epochs == 1 and len(stage1.history) == 1
        assert record["algorithm"]["error_set_size"] == info["n_errors"] == len(
            info["error_set"])
        # stage 2's epoch: every image once, each error image 3 more times (batch 4)
        assert record["step"] == math.ceil((32 + 3 * info["n_errors"]) / 4)


@pytest.mark.parametrize("method", ["lora", "vae2lat", "bvae2lat", "full", "linear"])
def test_every_method_runs(env, tmp_path, method):
    result = run(tiny_cfg(env, tmp_path, method=method, epochs=1), progress=False, log=quiet)
    params = result.metrics["params"]
    assert params["trainable"] > 0
    if method == "linear":
        assert params["trainable"] == 32 * 2 + 2
    history = records.read_history(result.run_dir / "history.jsonl")
    assert ("R" in history[0]["train"]) == (method in ("vae2lat", "bvae2lat"))


def test_bitfit_trains_the_biases_alone(env, tmp_path):
    """The method that is one file of robustbench_fvae/methods/ (nothing else names it): run
    accepts it, only bias terms and the head change, and it resumes its record."""
    from safetensors.torch import load_file

    from robustbench_fvae.methods import method_modules, method_names

    assert "bitfit" in method_modules() and method_names()[-1] == "bitfit"
    result = run(tiny_cfg(env, tmp_path, method="bitfit", epochs=1), progress=False, log=quiet)
    trained = load_file(str(result.run_dir / "adapter.safetensors"))
    head = {n for n in trained if n.startswith("head.")}
    assert head and trained.keys() - head and all(
        n.endswith(".bias") for n in trained.keys() - head)
    assert result.metrics["params"]["trainable"] == sum(t.numel() for t in trained.values())


def test_a_method_with_frozen_random_parts_reloads_to_its_predictions(env, tmp_path,
                                                                       monkeypatch):
    """A method registered in one file whose frozen part is random (LoRA-FA: A stays at its
    init, only B trains): the weights file holds B alone, and the reloaded model rebuilds A
    from the run's seed, so it reproduces the recorded predictions (probe and DFR read it)."""
    from robustbench_fvae.methods import lora, registry
    from robustbench_fvae.methods.setup import inject_slices
    from robustbench_fvae.training import predict

    def prepare(model, cfg):
        layers = inject_slices(model, lora.make_lora, cfg.adapter)
        for name, parameter in model.named_parameters():
            if name.endswith("lora_A"):
                parameter.requires_grad_(False)
        return layers

    method = registry.Method(name="lora-frozen-a", label="LoRA-FA", summary="A frozen",
                             trains="adapters", default_lr=5e-3, prepare=prepare)
    monkeypatch.setitem(registry._REGISTRY, method.name, method)
    rdir = run(tiny_cfg(env, tmp_path, method=method.name, epochs=1), progress=False,
               log=quiet).run_dir
    torch.manual_seed(123)  # the caller's RNG state must not matter
    model, _, splits = load_trained_model(rdir)
    prob, pred = predict(model, splits["test"], 16, 0, torch.device("cpu"))
    recorded = records.read_predictions(rdir / "predictions_test.csv")
    assert (pred == recorded["pred"]).all()
    assert abs(prob - recorded["prob"]).max() < 1e-5  # another A moved them by 5e-4 here


# 32 training images, batch 4: 8 steps per epoch; 2 epochs; a checkpoint every 2 steps. A kill
# after step 10 hits a step checkpoint in the middle of epoch 2; after step 11 it falls between
# two, so the resumed run redoes step 11. One case per distinct resume path (each costs a
# process start): the step-checkpoint boundary once (fvae, whose sampled z's must come back),
# every kind of trainable state once (LoRA; the FVAE family with K2, β-VAE2LAT standing for
# VAE2LAT too; full fine-tuning, whose state contains linear's head), GroupDRO's weights, JTT's
# error set, and peft's methods (AdaLoRA's rank allocator keeps state outside the parameters).
KILL_CASES = [("lora", 11, "erm"), ("fvae", 10, "erm"), ("fvae", 11, "erm"),
              ("bvae2lat", 11, "erm"), ("full", 11, "erm"), ("lora", 11, "groupdro"),
              ("fvae", 11, "jtt"), ("peft-dora", 11, "erm"), ("peft-adalora", 11, "erm")]


@pytest.mark.processes
@pytest.mark.parametrize(("method", "kill_after", "algorithm"), KILL_CASES)
def test_killed_mid_epoch_resumes_to_identical_predictions(env, tmp_path, method, kill_after,
                                                           algorithm):
    """SIGKILL at an exactly known step (fault injection in the runner, see training.py), then a
    relaunch: the prediction files are byte-identical to an uninterrupted run's. Every source of
    randomness (dropout, FVAE samples, augmentation, data order), the optimiser, schedule and
    loss sums, GroupDRO's weights and JTT's error set must come back exactly for this to hold."""
    extra = {"algorithm": algorithm}
    flags = ["--algorithm", algorithm]
    if algorithm == "jtt":  # stage 1: 1 epoch of 8 steps, so step 10 falls in stage 2
        extra.update(jtt_epochs=1, jtt_upweight=2)
        flags += ["--jtt-epochs", "1", "--jtt-upweight", "2"]
    reference = run(tiny_cfg(env, tmp_path / "ref", method=method, epochs=2, **extra),
                    progress=False, log=quiet)
    cfg = tiny_cfg(env, tmp_path / "killed", method=method, epochs=2, **extra)
    rdir = records.run_dir(cfg.out, _resolved(cfg))
    proc = launch(cli_args(cfg, "--checkpoint-every", "2", *flags),
                  RBF_FAULT_KILL_AFTER_STEP=str(kill_after))
    with reaped(proc):
        output, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, output
    assert not records.is_done(rdir)
    ckpt = torch.load(rdir / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["global_step"] == 10 and ckpt["step_in_epoch"] > 0  # in the middle of an epoch
    assert records.lock_path(rdir).exists()  # left behind by the kill; must not block
    if algorithm == "jtt":
        error_file = rdir / "jtt_error_set.json"
        stamp = error_file.stat().st_mtime_ns
        ref_info = records.read_json(reference.run_dir / "jtt_error_set.json")
        assert records.read_json(error_file)["error_set"] == ref_info["error_set"]
    resumed = run(cfg, progress=False, log=quiet)
    if algorithm == "jtt":  # the recorded error set is reused, not recomputed
        assert error_file.stat().st_mtime_ns == stamp
    for split in ("val", "test"):
        path = records.predictions_path
        assert path(resumed.run_dir, split).read_bytes() == \
            path(reference.run_dir, split).read_bytes(), split
    same_metrics(resumed.metrics, reference.metrics)
    history = records.read_history(rdir / "history.jsonl")
    assert [h["epoch"] for h in history] == [1, 2]
    assert history == records.read_history(reference.run_dir / "history.jsonl")


@pytest.mark.processes
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(env, tmp_path):
    reference = run(tiny_cfg(env, tmp_path / "ref", epochs=4), progress=False, log=quiet)
    cfg = tiny_cfg(env, tmp_path / "term", epochs=4)
    rdir = records.run_dir(cfg.out, _resolved(cfg))
    proc = launch(cli_args(cfg))
    with reaped(proc):
        # Frozen at a moment when an epoch is recorded, so the run cannot finish between our
        # check and the signal; SIGTERM stays pending while it is stopped and is handled as soon
        # as it continues, with epochs still to go.
        freeze_when(proc, lambda: (rdir / "history.jsonl").is_file(), "first epoch")
        assert not records.is_done(rdir)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        output, _ = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 143, output
    assert "SIGTERM: checkpoint written" in output
    assert (rdir / CHECKPOINT_FILE).is_file() and not records.is_done(rdir)
    result = run(cfg, progress=False, log=quiet)
    same_metrics(result.metrics, reference.metrics)


@pytest.mark.processes
def test_a_second_launch_of_a_running_config_does_not_train_it_again(env, tmp_path, capsys):
    """Two launches of one config: the second names the process that holds the run and exits 1;
    with --wait it waits for that process, then finds the run done. The run trains once."""
    cfg = tiny_cfg(env, tmp_path, epochs=2)
    rdir = records.run_dir(cfg.out, _resolved(cfg))
    first = launch(cli_args(cfg, "--checkpoint-every", "1"))
    waiter = None
    with reaped(first):
        freeze_when(first, lambda: (rdir / CHECKPOINT_FILE).is_file(), "first checkpoint")
        assert run_main(cli_args(cfg)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and "--wait" in err[0], err
        waiter = launch(cli_args(cfg, "--wait"))
        with reaped(waiter):
            # reading blocks until the waiter says it waits (or ends): an event, not a delay
            line = next((ln for ln in waiter.stdout if "waiting for" in ln), "")
            assert f"pid {first.pid}" in line, line
            os.kill(first.pid, signal.SIGCONT)
            first_out, _ = first.communicate(timeout=HANG_S)
            waiter_out, _ = waiter.communicate(timeout=HANG_S)
    assert first.returncode == 0, first_out
    assert waiter.returncode == 0, waiter_out
    assert "already done" in waiter_out and waiter_out.strip().splitlines()[-1] == str(rdir)
    assert [h["epoch"] for h in records.read_history(rdir / "history.jsonl")] == [1, 2]


# ---------------------------------------------------------------- alarms and bad input


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(env, tmp_path,
                                                                           capsys):
    cfg = tiny_cfg(env, tmp_path, method="lora", lr=1e30, warmup_frac=0.0, grad_clip=0.0)
    code = run_main(cli_args(cfg, "--lr", "1e30", "--warmup-frac", "0", "--grad-clip", "0",
                             "--method", "lora"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "non-finite" in err[0] and "last good checkpoint" in err[0]
    rdir = records.run_dir(cfg.out, _resolved(cfg))
    assert not records.is_done(rdir) and (rdir / "config.json").is_file()


def test_constant_predictor_is_flagged(env, tmp_path, capsys):
    """A backbone whose weights are all zero maps every image to the same features, so the
    linear probe on top can only predict one class: the run must say so."""
    cfg = tiny_cfg(env, tmp_path, method="linear", epochs=1)
    cfg.weights = str(env["zero"])
    result = run(cfg, progress=False, log=print)
    assert "constant predictor on val" in result.metrics["alarms"]
    assert "ALARM: constant predictor" in capsys.readouterr().out


def test_empty_eval_group_and_bad_settings_are_one_line_errors(env, tmp_path, capsys):
    data = tmp_path / "data"
    counts = {**COUNTS, "val": {0: 3, 1: 3, 2: 0, 3: 3}}
    make_waterbirds(data / "synth", counts=counts, synthetic_name="synth-waterbirds")
    cfg = tiny_cfg(env, tmp_path / "out")
    args = cli_args(cfg)
    args[args.index("--data-root") + 1] = str(data)
    assert run_main(args) == 2  # bad input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "waterbird/land" in err[0] and "val" in err[0]
    for bad, message in ((["--beta", "0.01"], "unbounded below"),
                         (["--targets", "query"], "matches no nn.Linear"),
                         (["--threads", "0"], "threads must be >= 1"),
                         (["--select", "val_wg", "--epochs", "0"], "epochs must be >= 1")):
        assert run_main(cli_args(cfg) + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(("args", "message"), [
    ([], "the following arguments are required: --method, --dataset"),
    (["--method", "lora", "--dataset", "nope"], "invalid choice: 'nope'"),
    (["--method", "lora", "--dataset", "synth-waterbirds", "--rank", "x"], "invalid int value"),
])
def test_argument_errors_print_a_short_usage_and_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        run_main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: python -m robustbench_fvae.run --method METHOD --dataset")
    assert len(err) <= 4 and message in err[-1], err


# ---------------------------------------------------------------- helpers


def _resolved(cfg: RunConfig) -> RunConfig:
    from robustbench_fvae.training import resolve_config

    return resolve_config(cfg)


def test_cli_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--method", "--rank", "--targets", "--alpha", "--beta", "--delta", "--mu-p2",
                 "--lambda-task", "--lambda-fvae", "--select", "--weights", "--epochs",
                 "--threads", "--wait"):
        assert flag in text
    assert "synth-waterbirds" in text and "bvae2lat" in text  # datasets and methods listed
    # typed metavars, and each flag states its default at most once
    assert "--rank N" in text and "--weights FILE" in text and "--data-root DIR" in text
    options = text.split("\n  --")[1:]
    assert len(options) > 40
    assert all(option.count("default") <= 1 for option in options), \
        [o for o in options if o.count("default") > 1]
    assert "(default: None)" not in text


# ---------------------------------------------------------------- data parallelism


@pytest.mark.processes
# GroupDRO's run is ERM's plus the all-reduced group losses, so it covers the ERM path too.
@pytest.mark.parametrize(("method", "algorithm"), [("lora", "groupdro"), ("peft-lora", "erm")])
def test_two_process_ddp_matches_one_process(env, tmp_path, method, algorithm):
    """torchrun with 2 CPU processes (gloo): each rank takes half of every batch and gradients
    are averaged, so with no dropout a LoRA run follows the single-process run; evaluation is
    sharded and gathered back in order, and only rank 0 writes the record. GroupDRO's group
    losses and weights are taken over the global batch, so they follow the single process too."""
    single = tiny_cfg(env, tmp_path / "one", method=method, epochs=2, algorithm=algorithm)
    single.adapter.lora_dropout = 0.0
    reference = run(single, progress=False, log=quiet)
    cfg = tiny_cfg(env, tmp_path / "two", method=method, epochs=2, algorithm=algorithm)
    cfg.adapter.lora_dropout = 0.0
    args = cli_args(cfg, "--lora-dropout", "0", "--algorithm", algorithm)
    env_vars = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}", RBF_TEST_THREADS="1",
                    HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + os.getpid() % 1000), str(TESTS / "tiny_models.py"), *args],
        env=env_vars, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rdir = Path(proc.stdout.strip().splitlines()[-1])
    assert rdir == records.run_dir(cfg.out, _resolved(cfg))
    assert rdir.name == reference.run_dir.name  # same settings, same hash
    assert records.is_done(rdir)
    config = records.read_json(rdir / "config.json")
    assert config["environment"]["device"] == "cpu x2"
    ddp_pred = records.read_predictions(rdir / "predictions_test.csv")
    one_pred = records.read_predictions(reference.run_dir / "predictions_test.csv")
    assert (ddp_pred["index"] == one_pred["index"]).all()
    assert abs(ddp_pred["prob"] - one_pred["prob"]).max() < 1e-4
    if algorithm == "groupdro":
        ddp_q = records.read_history(rdir / "history.jsonl")[-1]["algorithm"]["q"]
        one_q = records.read_history(reference.run_dir / "history.jsonl")[-1]["algorithm"]["q"]
        assert ddp_q == pytest.approx(one_q, abs=1e-5)
    # The gathered evaluation equals a single-process evaluation of the same weights.
    model, _, splits = load_trained_model(rdir)
    from robustbench_fvae.training import predict
    prob, _ = predict(model, splits["test"], 16, 0, torch.device("cpu"))
    assert abs(prob - ddp_pred["prob"]).max() < 1e-6
    assert records.recompute_metrics(rdir)["test"] == records.read_json(
        rdir / "metrics.json")["test"]
