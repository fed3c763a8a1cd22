import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny real run: synthetic data, 256 images, batch 32: 8 steps per epoch, cycle ends at 2 and 4. fp32 pinned:
# --amp auto measures (and may pick bf16 on one CPU and not on another); the tests of auto ask for it by name.
TINY = ["--data", "synthetic", "--subset", "256", "--batch-size", "32", "--warmup-epochs", "1", "--t0", "1",
        "--cycles", "2", "--lr", "0.1", "--no-progress", "--amp", "none"]


# CPU runs unless a test asks for the GPU (test_cuda.py): on a GPU host the CPU suite would otherwise train in TF32
# and ask torchrun's extra ranks for GPUs that are not there
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
GPU_ENV = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}


def train_cmd(args, torchrun=0, torchrun_args=()):
    """The command line of train.py, or of torchrun running it in `torchrun` processes."""
    return [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                                *torchrun_args] if torchrun else []) + [os.path.join(ROOT, "train.py")] + list(args)


def run_train(args, env=None, torchrun=0, check=True, fresh=False):
    """Run train.py (or torchrun with `torchrun` processes) in a process of its own; returns CompletedProcess. A
    plain run is forked from a server that has imported train.py's modules once (torch, timm: ~3 s a process,
    most of the suite's time), and runs the script as `python train.py` does: its own argv, environment, exit
    code, stdout and stderr. Runs with an environment of their own, torchrun, and fresh=True (one side of a
    comparison between processes: forked children share the server's hash seed and numpy state) get a new
    interpreter."""
    if torchrun or env or fresh:
        p = subprocess.run(train_cmd(args, torchrun), cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True,
                           text=True, timeout=600)
    else:
        p = forked_train(list(args))
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def forked_train(args, timeout=600):
    import multiprocessing
    import multiprocessing.forkserver
    import tempfile
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train", "conftest"])
    saved = dict(os.environ)
    try:  # the server starts (once) in the runs' environment, with train.py's and the tests' folders importable
        os.environ.clear()
        os.environ.update(ENV, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for name in (out, err):
            open(name, "w").close()
        child = ctx.Process(target=as_script, args=(os.path.join(ROOT, "train.py"), args, ENV, out, err))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(train_cmd(args), timeout)
        with open(out) as o, open(err) as e:
            stdout, stderr = o.read(), e.read()
        if child.exitcode and not stderr:  # it died before the script ran (the server's stderr has why)
            stderr = f"the forked train.py died before running (exit code {child.exitcode})"
        return subprocess.CompletedProcess(train_cmd(args), child.exitcode, stdout, stderr)


def as_script(path, args, env, out, err):
    """In a forked child: run `path` as `python path args` would, with `env`, stdout and stderr to files; exits
    with the script's code (atexit handlers run, as at an interpreter's exit)."""
    import atexit
    import gc
    import multiprocessing
    import runpy
    import threading
    import traceback
    import warnings
    assert "train" in sys.modules, "the server did not preload train.py's modules"
    # a main process again: DataLoader workers fork from it, as from `python train.py` (not through a forkserver)
    multiprocessing.set_start_method("fork", force=True)
    multiprocessing.process._parent_process = None
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    for fd, name in ((1, out), (2, err)):
        target = os.open(name, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", buffering=1, closefd=False)
    sys.argv, code = [path] + args, 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # as the interpreter's exit: join non-daemon threads, exit handlers, collect
        atexit._run_exitfuncs()
        gc.collect()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def step_context(step=0, rank=0, world_size=1, num_classes=10):
    """The methods' Context of one step, as train.py makes it (progress 0)."""
    from methods import Context
    return Context(step=step, epoch=0.0, rank=rank, world_size=world_size, seed=0, run_progress=0.0,
                   cycle_progress=0.0, num_classes=num_classes)


ONE_STEP = """import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
from methods import Context, MethodList, build
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
opt = torch.optim.SGD(net.parameters(), lr=1.0)  # one plain step: the change is the gradient the step used
before = [p.detach().clone() for p in net.parameters()]
g = torch.Generator().manual_seed(1)
x, y = 50 * torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 4, (8,), generator=g)
share = slice(rank * 8 // world, (rank + 1) * 8 // world)
ctx = Context(step=0, epoch=0.0, rank=rank, world_size=world, seed=0, run_progress=0.0, cycle_progress=0.0,
              num_classes=4)
scaler, autocast = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
train.train_step(model, opt, scaler, MethodList([build(m) for m in {methods!r}]), autocast, x[share], y[share], 2,
                 world > 1, ctx, clip_grad={clip})
step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
if rank == 0:
    torch.save(step, {out!r})
if world > 1:  # a clean gloo shutdown: without it a rank can abort at exit ("terminate called ...")
    dist.barrier()
    dist.destroy_process_group()
"""


def one_step_change(tmp_path, world, clip=0.0, methods=()):
    """The weights' change in one train_step (plain SGD, lr 1, 2 micro-steps, `methods` on) of a tiny linear model
    on 8 large-valued images: in one process, or shared by `world` gloo ranks under torchrun."""
    name = f"step{world}-{clip}-{'+'.join(methods)}"
    out, script = str(tmp_path / f"{name}.pt"), tmp_path / f"{name}.py"
    script.write_text(ONE_STEP.format(root=ROOT, clip=clip, methods=list(methods), out=out))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    p = subprocess.run([sys.executable] + launcher + [str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out)


@pytest.fixture
def tiny_run_args():
    return list(TINY)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped elsewhere; ./launch.sh gpu-check runs them)")
    config.addinivalue_line("markers", "slow: over ~5 s on 2 cores (several runs, torchrun, sweeps, notebooks); "
                                       "./launch.sh test --fast leaves them out")


# The tests over ~5 s on 2 cores (pytest --durations, parameters summed): several runs, torchrun, sweeps through launch.sh, the
# gpu-check dry run. `./launch.sh test --fast` leaves them out; CI and `./launch.sh test` run everything.
SLOW = {
    "test_the_emas_batchnorm_statistics_are_rank_0s_on_every_rank_at_each_evaluation",
    "test_the_loop_gives_each_rank_its_own_context_and_draws",
    "test_two_gloo_ranks_see_every_image_once_an_epoch_with_their_own_crops",
    "test_a_plug_in_named_like_a_paper_short_name_is_refused",
    "test_an_empty_method_set_is_named",
    "test_bad_method_name_is_refused",
    "test_dry_run_plans_each_run_once",
    "test_the_checks_of_a_model_leave_the_run_as_it_was",
    "test_tiny_real_sweep_end_to_end",
    "test_ranks_given_different_compile_choices_fail_in_one_line_before_training",
    "test_gpu_check_runs_every_check_in_its_cpu_dry_mode",
    "test_gpu_check_skips_a_check_whose_optional_package_is_missing",
    "test_a_row_after_only_skipped_steps_has_no_train_loss",
    "test_torchrun_restarts_a_killed_worker_and_finishes_the_same_run",
    "test_repro_plans_the_whole_study_seed_by_seed",
    "test_sam_perturbs_with_the_all_reduced_gradient_under_ddp",
    "test_resume_from_prev_moves_the_corrupt_last_aside",
    "test_a_cut_last_row_and_blank_lines_are_repaired_on_resume",
    "test_sweep_vit_is_the_vit_recipe_in_fp32_unless_the_extra_flags_ask",
    "test_the_resnet_counterpart_runs_the_same_design_with_the_small_resnet",
    "test_a_users_method_from_a_file_trains_records_itself_and_resumes_exactly",
    "test_sigkill_then_resume_gives_the_same_run",
    "test_resume_auto_removes_nothing_it_cannot_resume",
    "test_the_vit_study_pilot_plans_its_standard_runs_at_three_budgets_only",
    "test_non_finite_validation_stops_the_run_without_done",
    "test_more_seeds_adds_seeds_3_and_4_of_the_resolved_sets_with_the_cyclic_estimator_only",
    "test_the_planners_csv_is_the_lr_the_optimizer_used_and_tensorboard_mirrors_the_rows",
    "test_torchrun_two_processes_match_single_process_evaluation",
    "test_a_full_disk_during_a_run_is_one_line_from_train_py",
    "test_a_run_on_shards_of_unchanged_images_equals_the_folder_run",
    "test_a_finished_run_is_never_redone_by_resume",
    "test_corrupt_newest_checkpoint_falls_back_to_the_previous",
    "test_benchmark_compares_like_with_like",
    "test_the_new_methods_resume_exactly_and_change_the_run",
    "test_a_resumed_run_hides_what_the_killed_process_logged_after_its_checkpoint",
    "test_clipping_bounds_the_global_norm_of_the_all_reduced_accumulated_gradient",
    "test_two_ranks_with_accumulation_equal_one_process",
    "test_a_cut_row_that_the_checkpoint_counts_is_refused_and_kept",
    "test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint",
    "test_a_second_process_on_the_same_run_dir_is_refused",
    "test_three_ranks_count_every_validation_image_once",
    "test_a_damaged_image_is_named_by_prepare_and_by_the_loader",
    "test_the_loop_hands_methods_the_budgets_progress_and_drives_every_parameter_group",
    "test_a_finished_run_whose_recipe_file_changed_is_not_skipped",
    "test_a_tiny_vit_trains_both_curves_and_a_method_that_does_not_fit_says_so",
    "test_an_injected_slowdown_changes_the_measured_axis_and_neither_calibrated_time_nor_flops",
    "test_a_run_records_its_flops_and_progressive_resizing_rows_follow_its_sizes",
    "test_a_compiled_run_agrees_with_the_eager_run",
    "test_calibrate_times_a_compiled_runs_steps_compiled_and_an_eager_runs_eager",
    # over ~5 s (all parameters together) under load: moved so that --fast stays under 3 minutes
    "test_a_bad_recipe_is_refused_in_one_line_before_anything_is_written",
    "test_a_killed_image_folder_run_resumes_to_the_same_metrics",
    "test_a_recipe_gives_the_config_json_of_its_flags",
    "test_a_resumed_process_continues_instead_of_restarting",
    "test_a_single_runs_report_draws_its_figure",
    "test_a_sweep_takes_its_shape_from_the_recipe_and_passes_it_to_every_run",
    "test_a_two_node_sweep_gives_each_run_its_own_rendezvous_and_one_report",
    "test_bare_method_flags_take_their_documented_values",
    "test_baseline_and_channels_last_run_different_kernels",
    "test_batchnorm_recalibration_uses_every_ranks_images",
    "test_calibrate_refuses_bad_input_in_one_line_and_writes_nothing",
    "test_checkpoints_between_evaluations_resume_exactly",
    "test_complete_seeds_compares_an_unfinished_sweep_over_the_seeds_both_curves_have",
    "test_cyclic_run_follows_the_contract",
    "test_holm_keeps_the_familywise_level_and_drops_exactly_one_verdict",
    "test_kendall_taus_ci_draws_the_same_seeds_for_both_curves",
    "test_methods_come_from_one_place",
    "test_one_seed_identical_seeds_and_no_baseline_give_empty_statistics_with_a_reason",
    "test_report_skips_a_run_whose_config_the_figures_cannot_use",
    "test_resume_auto_starts_fresh_without_checkpoint_and_refuses_changes",
    "test_resume_refuses_a_checkpoint_that_differs_in_any_result_option",
    "test_resume_with_dropout_and_drop_path_is_exact",
    "test_runs_on_two_kinds_of_hardware_are_two_groups_unless_pooled_and_then_it_says_so",
    "test_schedule_free_and_cyclic_decay_runs",
    "test_standard_run_and_default_run_dir",
    "test_standard_takes_t_mult_and_ends_on_the_cyclic_step",
    "test_train_loss_epoch_is_the_last_epochs_mean_loss_whatever_the_evaluation_cadence",
    "test_train_py_warns_in_one_line_of_a_before_step_ordered_before_sam",
    "test_training_time_counts_training_steps_only",
    "test_validation_metrics_equal_plain_pytorch_with_methods_on",
    "test_wandb_gets_the_config_and_every_row_offline_unless_configured",
    "test_wsd_resumes_exactly_inside_and_between_branches",
    "test_a_plan_is_the_sweeps_runs_in_its_order_and_runs_nothing",
    "test_a_signal_ends_every_child_a_failed_run_does_not_stop_the_others_and_none_runs_twice",
    "test_parallel_two_on_cpu_equal_the_sequential_sweep_but_for_the_times",
    "test_a_local_array_two_at_once_killed_and_requeued_resumes_to_the_sweeps_numbers",
    "test_a_signal_mid_training_checkpoints_the_next_step_exits_128_plus_it_and_resumes_exactly",
    "test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes_exactly",
    "test_every_documented_command_of_ours_passes_its_check",
    "test_a_sigterm_to_every_process_of_a_folder_run_stops_it_at_a_checkpoint",
    "test_a_committed_report_is_what_its_recorded_command_writes_today",
}


def pytest_collection_modifyitems(config, items):
    import torch
    for item in items:
        if getattr(item, "originalname", item.name) in SLOW:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
