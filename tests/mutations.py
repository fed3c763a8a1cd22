"""The mutation audit, by hand made repeatable: apply each mutation, run the tests that must catch it, revert.

    python tests/mutations.py [NAME ...]      # all by default; prints caught / MISSED per mutation

Not part of the suite (it edits the source tree, one mutation at a time, and restores it). Each entry is
(name, file, original text, mutated text, the tests that must fail)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = "tests/test_train.py::"
MUTATIONS = [
    ("resume restarts from scratch", "train.py", "            return ckpt, False", "            return None, True",
     T + "test_a_resumed_process_continues_instead_of_restarting"),
    ("DDP all-reduce on the first micro-step", "train.py", "sync = not ddp or micro == grad_accum - 1",
     "sync = not ddp or micro == 0", T + "test_two_ranks_with_accumulation_equal_one_process"),
    ("bare --label-smoothing gives eps 0", "train.py", 'nargs="?", const=0.1, default=0.0, metavar="EPS"',
     'nargs="?", const=0.0, default=0.0, metavar="EPS"', T + "test_bare_method_flags_take_their_documented_values"),
    ("SGDW weight-decay scaling removed", "train.py", "weight_decay=args.weight_decay / args.lr)",
     "weight_decay=args.weight_decay)", T + "test_sgdw_decays_by_wd_times_lr_over_peak"),
    ("non-finite error reports the evaluation step", "train.py",
     "~torch.isfinite(loss), state.step, first_bad)", "~torch.isfinite(loss), state.step // 8 * 8 + 7, first_bad)",
     "tests/test_reliability.py::test_first_bad_step_is_reported_and_the_checkpoint_before_it_kept"),
    ("non-finite error reports the latest bad step", "train.py",
     "(first_bad == NO_STEP) & ~torch.isfinite(loss)", "~torch.isfinite(loss)",
     "tests/test_reliability.py::test_first_bad_step_is_reported_and_the_checkpoint_before_it_kept"),
    ("improvement over the baseline with its sign flipped", "analysis/compare.py",
     "improvement_pp=a.acc_mean - b.acc_mean", "improvement_pp=b.acc_mean - a.acc_mean",
     "tests/test_analysis.py::test_improvement_figure_data_has_the_sign_of_method_minus_baseline"),
    ("--channels-last a no-op (weights and batches)", "methods/channels_last.py",
     "    if isinstance(tensor_or_model, torch.nn.Module):", "    return tensor_or_model\n    if False:",
     T + "test_baseline_and_channels_last_run_different_kernels"),
    ("--channels-last a no-op on batches only", "methods/channels_last.py",
     "return tensor_or_model.contiguous(memory_format=torch.channels_last)", "return tensor_or_model",
     "tests/test_methods.py"),
    ("MixUp a no-op", "methods/soft_targets.py", "        return self.mixup(x, y)",
     "        return x, mixup_target(y, self.num_classes, 1.0, self.label_smoothing)", "tests/test_methods.py"),
    ("baseline batches channels-last again", "data.py",
     "        return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))",
     "        return x.gather(3, cols[:, None, None, :].expand(n, c, h, w)).contiguous("
     "memory_format=torch.channels_last)", "tests/test_data.py"),
    ("a skipped step leaves BatchNorm statistics moved", "train.py", "                    b.copy_(saved)",
     "                    pass",
     "tests/test_reliability.py::test_a_skipped_step_leaves_no_trace_in_weights_or_batchnorm"),
    ("wsd branch not a copy: trunk goes on from the branch", "train.py",
     "        return copy.deepcopy(self.path_state(state))", "        return self.path_state(state)",
     "tests/test_estimators.py::test_a_wsd_branch_is_a_true_copy"),
    ("wsd checkpoint inside a branch without the trunk", "train.py", "trunk=trunk, config=",
     "trunk=None, config=", "tests/test_estimators.py::test_wsd_resumes_exactly_inside_and_between_branches"),
    ("percentile bootstrap CI (52-74 % coverage at 2-3 seeds)", "analysis/stats.py",
     "    half = t975(n - 1) * float(r.std()) * math.sqrt(n / (n - 1))\n    return c - half, c + half",
     "    return tuple(float(q) for q in np.percentile(r, [2.5, 97.5]))",
     "tests/test_stats.py::test_the_95_percent_interval_covers_95_percent_with_few_seeds"),
    ("a copied run counted as another seed", "analysis/runs.py", "            if p.seed in seeds:",
     "            if False:",
     "tests/test_analysis.py::test_a_copied_run_is_not_another_seed_and_other_hardware_is_another_group"),
    ("standard budget not on the cyclic step", "schedules.py",
     "    except ValueError:\n        return round(epochs * steps_per_epoch)\n    return round(",
     "    except ValueError:\n        pass\n    return round(epochs * steps_per_epoch)\n    return round(",
     "tests/test_schedules.py::test_standard_budgets_end_on_the_cyclic_runs_step_for_awkward_step_counts"),
    ("no lock on the run directory", "rundir.py", "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "        pass",
     "tests/test_reliability.py::test_a_second_process_on_the_same_run_dir_is_refused"),
    ("blur after the conv by default", "methods/__init__.py", '"blur-first": True, "conv-first": False',
     '"blur-first": False, "conv-first": True', "tests/test_methods.py"),
    ("analysis averages runs of another lr as seeds", "analysis/runs.py", '"subset", "lr", ', '"subset", ',
     "tests/test_analysis.py::test_runs_that_differ_in_a_result_option_are_never_averaged"),
]


def main(names):
    results = []
    for name, path, old, new, tests in MUTATIONS:
        if names and name not in names:
            continue
        full = os.path.join(ROOT, path)
        source = open(full).read()
        if source.count(old) < 1:
            results.append((name, "NOT APPLIED (text not found)", tests))
            continue
        try:
            with open(full, "w") as f:
                f.write(source.replace(old, new, 1))
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + tests.split(),
                               cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            results.append((name, "caught" if p.returncode != 0 else "MISSED", tests))
        finally:
            with open(full, "w") as f:
                f.write(source)
        print(f"{results[-1][1]:>8}  {name}  ({tests})", flush=True)
    return 0 if all(r[1] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
