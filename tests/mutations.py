"""The mutation audit, by hand made repeatable: apply each mutation, run the tests that must catch it, revert.

    python tests/mutations.py [NAME ...]      # all by default; prints caught / MISSED per mutation

Not part of the suite (it edits the source tree, one mutation at a time, and restores it). Each entry is
(name, file, original text, mutated text, the tests that must fail)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = "tests/test_train.py::"
EVAL, ACC, R = "tests/test_evaluation.py::", "tests/test_accounting.py::", "tests/test_resume.py::"
G, M, S = "tests/test_gpu_paths.py::", "tests/test_method_api.py::", "tests/test_shards.py::"
CLIP = "tests/test_optimizers.py::test_clipping_bounds_the_global_norm_of_the_all_reduced_accumulated_gradient"
PLAIN = EVAL + "test_validation_metrics_equal_plain_pytorch_with_methods_on"
EMA_TEST = M + "test_ema_averages_weights_and_batchnorm_statistics_with_its_decay_and_evaluates_both"
DROP_PATH = M + "test_drop_path_drops_whole_samples_rescales_the_kept_and_is_off_at_evaluation"
LOOP = M + "test_the_loop_hands_methods_the_budgets_progress_and_drives_every_parameter_group"
MUTATIONS = [
    ("resume restarts from scratch", "train.py", "    return ckpt, False\n", "    return None, True\n",
     T + "test_a_resumed_process_continues_instead_of_restarting"),
    ("DDP all-reduce on the first micro-step", "train.py", "sync = not ddp or micro == grad_accum - 1",
     "sync = not ddp or micro == 0", T + "test_two_ranks_with_accumulation_equal_one_process"),
    ("bare --label-smoothing gives eps 0", "methods/label_smoothing.py",
     'nargs="?", const=0.1, default=0.0, metavar="EPS"',
     'nargs="?", const=0.0, default=0.0, metavar="EPS"', T + "test_bare_method_flags_take_their_documented_values"),
    ("SGDW weight-decay scaling removed", "train.py", "weight_decay=args.weight_decay / args.lr,",
     "weight_decay=args.weight_decay,", T + "test_sgdw_decays_by_wd_times_lr_over_peak"),
    ("non-finite error reports the evaluation step", "train.py",
     "~torch.isfinite(loss), state.step, first_bad)", "~torch.isfinite(loss), state.step // 8 * 8 + 7, first_bad)",
     "tests/test_reliability.py::test_first_bad_step_is_reported_and_the_checkpoint_before_it_kept"),
    ("non-finite error reports the latest bad step", "train.py",
     "(first_bad == NO_STEP) & ~torch.isfinite(loss)", "~torch.isfinite(loss)",
     "tests/test_reliability.py::test_first_bad_step_is_reported_and_the_checkpoint_before_it_kept"),
    ("a curve with extra seeds compared unpaired", "analysis/compare.py",
     "    pairs, shared_note = on_shared_seeds(pairs)", "    shared_note = None",
     "tests/test_analysis.py::test_curves_with_extra_seeds_on_one_side_are_compared_over_the_seeds_both_hold"),
    ("an improvement with extra baseline seeds compared unpaired", "analysis/compare.py",
     "    pairs, _ = on_shared_seeds(pairs)", "    pass",
     "tests/test_analysis.py::test_curves_with_extra_seeds_on_one_side_are_compared_over_the_seeds_both_hold"),
    ("improvement correlation against the baseline's unshared seeds", "analysis/compare.py",
     "((std_m, std_base),), _ = on_shared_seeds(bs)", "((std_m, std_base),), _ = bs, None",
     "tests/test_analysis.py::test_curves_with_extra_seeds_on_one_side_are_compared_over_the_seeds_both_hold"),
    ("improvement over the baseline with its sign flipped", "analysis/compare.py",
     "improvement_pp=a.acc_mean - b.acc_mean", "improvement_pp=b.acc_mean - a.acc_mean",
     "tests/test_analysis.py::test_improvement_figure_data_has_the_sign_of_method_minus_baseline"),
    ("--channels-last a no-op (weights and batches)", "methods/channels_last.py",
     "    if isinstance(tensor_or_model, torch.nn.Module):", "    return tensor_or_model\n    if False:",
     T + "test_baseline_and_channels_last_run_different_kernels"),
    ("--channels-last a no-op on batches only", "methods/channels_last.py",
     "return tensor_or_model.contiguous(memory_format=torch.channels_last)", "return tensor_or_model",
     "tests/test_methods.py"),
    ("MixUp a no-op", "methods/mixup.py", "        lam = self.mixer._mix_batch(x)", "        lam = 1.0",
     "tests/test_methods.py"),
    ("baseline batches channels-last again", "data.py",
     "        return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))",
     "        return x.gather(3, cols[:, None, None, :].expand(n, c, h, w)).contiguous("
     "memory_format=torch.channels_last)", "tests/test_data.py"),
    ("a skipped step leaves BatchNorm statistics moved", "train.py",
     "                b.copy_(saved)\n        return True", "                pass\n        return True",
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
    ("blur after the conv by default", "methods/blurpool.py", '"blur-first": True, "conv-first": False',
     '"blur-first": False, "conv-first": True', "tests/test_methods.py"),
    ("analysis averages runs of another lr as seeds", "analysis/runs.py", '"image_size", "lr", "batch_size"',
     '"image_size", "batch_size"',
     "tests/test_analysis.py::test_runs_that_differ_in_a_result_option_are_never_averaged"),
    # round 2 of the audit (issue 29): evaluation, precision, time, pairing, grouping, RNG
    ("top-1 counts the top 2", "train.py", "hit[:, :1].sum()", "hit[:, :2].sum()", PLAIN),
    ("label smoothing applied to validation", "train.py", 'F.cross_entropy(logits, y, reduction="sum")',
     'F.cross_entropy(logits, y, reduction="sum", label_smoothing=0.1)', PLAIN),
    ("MixUp applied to validation inputs", "train.py", "logits = model(x).float()",
     "logits = model(0.8 * x + 0.2 * x.flip(0)).float()", PLAIN),
    ("validation images cropped and flipped", "data.py", "yield self.normalize(self.val_x[j]), self.val_y[j]",
     "yield self.normalize(self.augment(self.val_x[j], torch.randint(-self.pad, self.pad + 1, (len(j), 2), "
     "device=self.device), torch.rand(len(j), device=self.device) < 0.5)), self.val_y[j]", PLAIN),
    ("resident validation drops the remainder over ranks", "data.py",
     "idx = torch.arange(rank, len(self.val_y), world_size",
     "idx = torch.arange(rank, len(self.val_y) - len(self.val_y) % world_size, world_size",
     EVAL + "test_three_ranks_count_every_validation_image_once"),
    ("resident validation pads the shards (images counted twice)", "data.py",
     "idx = torch.arange(rank, len(self.val_y), world_size, device=self.device)",
     "idx = torch.arange(rank, -(-len(self.val_y) // world_size) * world_size, world_size, device=self.device) "
     "% len(self.val_y)", EVAL + "test_three_ranks_count_every_validation_image_once"),
    ("ImageFolder validation drops the remainder over ranks", "imagefolder.py",
     "idx = list(range(rank, len(self.val_set), world_size))",
     "idx = list(range(rank, len(self.val_set) - len(self.val_set) % world_size, world_size))",
     EVAL + "test_image_folder_validation_shards_hold_every_image_once"),
    ("ImageFolder validation images cropped at random", "imagefolder.py",
     "v2.CenterCrop(image_size)])", "v2.RandomCrop(image_size)])",
     EVAL + "test_image_folder_validation_images_are_resized_and_centre_cropped_only"),
    ("bf16 recorded, autocast off", "train.py", "enabled=amp_dtype is not None)", "enabled=False)",
     ACC + "test_the_recorded_precision_is_the_one_the_model_computes_in"),
    ("schedule-free evaluated at its training weights", "train.py", "        self.optimizer.eval()\n", "",
     EVAL + "test_schedule_free_evaluates_its_averaged_weights"),
    ("seeds paired by position, not by id", "analysis/stats.py", "values = b.values[[b.ids.index(i) for i in a.ids]]",
     "values = b.values", "tests/test_analysis.py::test_seeds_are_paired_by_id_not_by_position"),
    ("evaluation and checkpoint time counted as training", "train.py",
     "                    last_save = time.monotonic()\n                    clock.start()",
     "                    last_save = time.monotonic()", ACC + "test_training_time_counts_training_steps_only"),
    ("a wsd branch's cost counted twice", "train.py", "        state.cost_time += dt",
     "        state.cost_time += dt * (1 + (state.trunk is not None))",
     ACC + "test_training_time_counts_training_steps_only"),
    ("analysis averages runs of another precision", "analysis/runs.py", '"eta_min", "amp",', '"eta_min",',
     "tests/test_analysis.py::test_seeds_that_differ_in_any_result_option_are_never_averaged"),
    ("analysis averages runs of another world size", "analysis/runs.py", '"world_size", "device"', '"device"',
     "tests/test_analysis.py::test_seeds_that_differ_in_any_result_option_are_never_averaged"),
    ("resume accepts another precision", "options.py", '"weight_decay", "amp", "methods",',
     '"weight_decay", "methods",',
     ACC + "test_resume_refuses_a_checkpoint_that_differs_in_any_result_option"),
    ("global RNG not restored on resume", "train.py", '    restore_rng(path["rng"])\n', "",
     ACC + "test_resume_with_dropout_and_drop_path_is_exact"),
    ("the tradeoff figure draws other numbers than the curves", "analysis/report.py",
     "    means = [p.acc_mean for p in pts]", "    means = [p.acc_mean + 0.5 for p in pts]",
     "tests/test_analysis.py::test_report_writes_every_figure_and_links_them"),
    ("the benchmark's loop ignores --channels-last", "benchmarks/throughput.py",
     'f"--method={spec}" for spec in methods.specs]', ']',
     "tests/test_data.py::test_benchmark_compares_like_with_like"),
    # GPU and cluster paths (issue 22), where a CPU shows them
    ("schedule-free evaluation leaves its round trip in the weights", "methods/api.py",
     "        model.load_state_dict(saved)\n", "        pass\n", G + "test_schedule_free_evaluations_leave_no_trace"),
    ("BatchNorm recalibration keeps rank 0's slice only", "train.py",
     "                dist.all_reduce(stat)\n                stat /= dist.get_world_size()", "                pass",
     G + "test_batchnorm_recalibration_uses_every_ranks_images"),
    ("a wsd cooldown's last step above eta_min", "schedules.py", "x = (t + 1) / length", "x = t / length",
     "tests/test_estimators.py::test_wsd_segments_and_cooldowns"),
    ("--amp auto counts emulated bf16 on a GPU", "options.py",
     "return torch.cuda.is_bf16_supported(including_emulation=False)", "return torch.cuda.is_bf16_supported()",
     G + "test_amp_auto_on_a_gpu_takes_bf16_only_where_it_is_native"),
    ("a file system without locks is a traceback", "rundir.py", "    except OSError as e:  # Lustre",
     "    except ZeroDivisionError as e:  # Lustre", G + "test_a_file_system_without_locks_is_one_line_naming_no_lock"),
    ("a resume on other hardware accepted", "options.py", '"deterministic", "device_name",', '"deterministic",',
     G + "test_a_resume_on_other_hardware_is_refused_unless_allowed"),
    # optimizers from timm (issue 24)
    ("--clip-grad a no-op", "train.py", "        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)",
     "        pass", CLIP),
    ("clipping each micro-step's gradient before the all-reduce", "train.py",
     "            scaler.scale(loss).backward()\n            total += loss.detach()",
     "            scaler.scale(loss).backward()\n            total += loss.detach()\n            if clip_grad:\n"
     "                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad / grad_accum)", CLIP),
    ("decay exclusions ignored", "train.py", "model if exclusions else model.parameters(), opt=args.opt",
     "model.parameters(), opt=args.opt",
     "tests/test_optimizers.py::test_each_optimizer_spares_biases_and_norm_weights_where_asked"),
    # reliability round 3 (issue 28)
    ("a last line cut short counted as a row", "rundir.py", 'if line.endswith("\\n") and line.strip()]',
     'if line.strip()]', R + "test_a_cut_row_that_the_checkpoint_counts_is_refused_and_kept"),
    ("blank lines counted as rows", "rundir.py", 'if line.endswith("\\n") and line.strip()]',
     'if line.endswith("\\n")]', R + "test_a_cut_last_row_and_blank_lines_are_repaired_on_resume"),
    ("checkpoints loaded without their CRC check", "rundir.py", "            verify_checkpoint(path)\n", "",
     R + "test_a_checkpoint_with_flipped_bytes_is_never_loaded"),
    ("--resume auto wipes what it cannot resume", "train.py",
     "    if (ours or bare) and not files and (rows or 0) <= 1:",
     "    if True:", R + "test_resume_auto_removes_nothing_it_cannot_resume"),
    ("a sweep skips any finished run", "launch.sh", '[ -e "$dir/done" ] && same_argv "$dir" $argv;',
     '[ -e "$dir/done" ];', "tests/test_launch.py::test_tiny_real_sweep_end_to_end"),
    ("the evaluation cadence not result-defining", "options.py", '"eval_every", "model_kwargs",', '"model_kwargs",',
     R + "test_resume_with_another_evaluation_cadence_is_refused"),
    ("a damaged image read in a worker is a traceback", "imagefolder.py",
     "        return named_sample(dataset, index, read)\n    finally", "        return dataset[index]\n    finally",
     "tests/test_data.py::test_a_damaged_image_stops_the_run_with_one_line_naming_it"),
    # the ImageNet pipeline (issue 26) and recipes (issue 27)
    ("the GPU path draws its flip before the crop", "imagefolder.py",
     "        top, left, h, w = T.RandomResizedCrop.get_params(",
     "        flip = torch.rand(1)\n        top, left, h, w = T.RandomResizedCrop.get_params(",
     "tests/test_imagefolder.py::test_the_gpu_decode_path_augments_as_the_cpu_path"),
    ("each rank reads the whole batch", "data.py", "    lo = step * batch_size + rank * local",
     "    lo = step * batch_size", "tests/test_imagefolder.py::test_two_gloo_ranks_see_every_image_once_an_epoch_with_their_own_crops"),
    ("workers keep the run's lock", "rundir.py", "os.register_at_fork(after_in_child=_release_in_child)\n", "\n", "tests/test_imagefolder.py::test_a_killed_image_folder_run_resumes_to_the_same_metrics"),
    ("a recipe's value wins over the flag", "options.py", "            if dest not in given and RESTATED.get(dest) not in given:",
     "            if RESTATED.get(dest) not in given:",
     "tests/test_recipes.py::test_flags_override_the_recipe_and_a_later_recipe_an_earlier_one"),
    ("TensorBoard keeps the killed process's rows", "trackers.py", "purge_step=resumed_at + 1 if resumed_at else None",
     "purge_step=None", "tests/test_trackers.py::test_a_resumed_run_hides_what_the_killed_process_logged_after_its_checkpoint"),
    ("shards store every image re-encoded", "shards.py", "        if jpeg and min(width, height) <= short_side:",
     "        if False:", S + "test_shards_of_small_jpegs_give_the_folder_trees_batches"),
    ("shards in another order than the tree", "shards.py", "    jobs = [(path, short_side, quality) for path, _ in folder.samples]",
     "    jobs = [(path, short_side, quality) for path, _ in sorted(folder.samples, key=lambda s: s[0][::-1])]",
     S + "test_shards_of_small_jpegs_give_the_folder_trees_batches"),
    ("an unfinished prepare is trained on", "imagefolder.py", "    if os.path.exists(os.path.join(root, shards.MARK)):",
     "    if False:", S + "test_prepare_refuses_to_write_over_anything_and_finishes_an_interrupted_one"),
    ("the GPU path reads a shard's image from the tree", "imagefolder.py",
     '        if hasattr(base, "encoded"):  # shards', '        if False:  # shards',
     S + "test_large_images_are_resized_and_other_formats_reencoded"),
    ("a shard cut short is read", "shards.py", "            if have != size:", "            if False:",
     S + "test_a_shard_cut_short_or_missing_and_mixed_storage_are_refused"),
    ("a resume onto shards prepared again", "train.py",
     '    if stored is not None and stored != getattr(data, "storage", None):', "    if False:",
     S + "test_a_run_on_shards_of_unchanged_images_equals_the_folder_run"),
    ("prepare stores small JPEGs undecoded", "shards.py", "        img = decode(data)  # a damaged",
     "        img = decode(data) if not (jpeg and min(width, height) <= short_side) else None  # a damaged",
     S + "test_a_damaged_image_is_named_by_prepare_and_by_the_loader"),
    ("a shard image's size read width first", "shards.py", "        return tuple(int(v) for v in self.index[i, 4:6])",
     "        return tuple(int(v) for v in self.index[i, 4:6][::-1])",
     S + "test_large_images_are_resized_and_other_formats_reencoded"),
    # the method API (issue 23)
    ("SAM steps with the plain gradient", "methods/sam.py", "        ctx.forward_backward()\n", "",
     M + "test_sam_updates_with_the_gradient_at_the_perturbed_weights"),
    ("SAM skipped under gradient accumulation", "train.py",
     "    if methods.reruns:", "    if methods.reruns and grad_accum == 1:",
     M + "test_sam_updates_with_the_gradient_at_the_perturbed_weights"),
    ("SAM's rerun sees a freshly mixed batch", "methods/api.py", "            x, y = x.clone(), y.clone()",
     "            pass",
     M + "test_sams_second_pass_sees_the_same_augmented_batch"),
    ("EMA evaluates the trained weights", "methods/ema.py",
     "            model.load_state_dict(self.ema.module.state_dict())\n", "",
     M + "test_ema_averages_weights_and_batchnorm_statistics_with_its_decay_and_evaluates_both"),
    ("the methods' state not in checkpoints", "train.py", " methods=self.methods.state_dict(),", "",
     M + "test_the_new_methods_resume_exactly_and_change_the_run"),
    ("progressive resizing ramps over the run, not the budget", "methods/progressive_resizing.py",
     "ctx.cycle_progress), self.size(x.shape[-1], ctx.cycle_progress)",
     "ctx.run_progress), self.size(x.shape[-1], ctx.run_progress)",
     M + "test_progressive_resizing_sizes_and_its_ramp_per_budget"),
    ("label smoothing after MixUp", "methods/label_smoothing.py", '"label_smoothing", "ls", 10,',
     '"label_smoothing", "ls", 25,', M + "test_label_smoothing_then_mixup_is_timms_mixup_with_smoothing_to_the_bit"),
    ("a plug-in's file hash not recorded", "methods/registry.py", "            register(cls, digest)",
     "            register(cls)", M + "test_a_users_method_from_a_file_trains_records_itself_and_resumes_exactly"),
    ("canonical specs write the defaults", "methods/api.py",
     "        return {k: getattr(self, k) for k, d in self.options.items() if getattr(self, k) != d}",
     "        return {k: getattr(self, k) for k in self.options}", M + "test_specs_are_canonical_and_name_the_options"),
    ("an old run's non-default strength read as the default", "analysis/runs.py",
     "        out.append(m if value == default", "        out.append(m if True",
     M + "test_old_runs_are_read_with_the_apis_names"),
    ("a method's check not called", "train.py", "        methods.check(SimpleNamespace(",
     "        (SimpleNamespace(", M + "test_a_plug_in_check_refuses_bad_options_in_one_line"),
    # the outside audit, round 3 (issue 43): the methods, parameter groups and ranks
    ("EMA with decay and 1 - decay swapped", "methods/ema.py", "ModelEmaV3(model, decay=self.decay,",
     "ModelEmaV3(model, decay=1 - self.decay,", EMA_TEST),
    ("EMA copies the BatchNorm statistics instead of averaging them", "methods/ema.py",
     "warmup_power=self.warmup_power)", "warmup_power=self.warmup_power, exclude_buffers=True)", EMA_TEST),
    ("EMA evaluates its averaged parameters but the live buffers", "methods/ema.py",
     "            model.load_state_dict(self.ema.module.state_dict())",
     "            model.load_state_dict(dict(self.ema.module.named_parameters()), strict=False)", EMA_TEST),
    ("CutMix mixes validation batches", "methods/cutmix.py", "    def config(self):\n        return {}",
     "    def transform_eval_batch(self, x):\n        x = x.clone()\n        x[..., :8, :8] = x.flip(0)[..., :8, :8]\n"
     "        return x\n\n    def config(self):\n        return {}", PLAIN),
    ("SAM leaves its second pass's BatchNorm statistics", "methods/sam.py",
     "            for b, saved in zip(model.buffers(), buffers):\n                b.copy_(saved)", "            pass",
     M + "test_sams_second_pass_leaves_the_batchnorm_statistics_of_the_first"),
    ("drop-path without its 1/keep scaling", "models.py", "DropPath(drop_path) if drop_path > 0",
     "DropPath(drop_path, scale_by_keep=False) if drop_path > 0", DROP_PATH),
    ("drop-path active at evaluation", "models.py", "self.act(self.drop_path(self.bn2(self.conv2(out)))",
     "self.act(__import__('timm').layers.drop_path(self.bn2(self.conv2(out)), getattr(self.drop_path, 'drop_prob', "
     "0.0), True)", DROP_PATH + " " + PLAIN),
    ("progressive resizing validates at the reduced size", "methods/progressive_resizing.py",
     "    def transform_batch(self, x, y, ctx):",
     "    def transform_eval_batch(self, x):\n        return F.interpolate(x, size=(self.size(x.shape[-2], 0.0),) * 2, "
     "mode='bilinear', antialias=True)\n\n    def transform_batch(self, x, y, ctx):", LOOP + " " + PLAIN),
    ("the loop hands the methods the run's progress as the cycle's", "train.py",
     "cycle_progress=self.plan.budget_progress(path_step)", "cycle_progress=path_step / self.plan.total_steps", LOOP),
    ("gradient clipped before the GradScaler's unscale", "train.py",
     "        scaler.unscale_(optimizer)\n        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)",
     "        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)\n        scaler.unscale_(optimizer)",
     "tests/test_optimizers.py::test_clipping_under_a_gradscaler_takes_its_scale_out_first"),
    ("the warmup drives the first parameter group only", "schedules.py",
     "warmup = LambdaLR(optimizer, lambda s: (s + 1) / plan.warmup_steps)",
     "warmup = LambdaLR(optimizer, [lambda s: (s + 1) / plan.warmup_steps] + [lambda s: 1.0] * "
     "(len(optimizer.param_groups) - 1))", LOOP),
    ("cyclic-decay and wsd drive the first parameter group only", "schedules.py",
     "return LambdaLR(optimizer, lambda s: lr_at(plan, min(s, plan.run_steps - 1), peak, eta_min) / peak)",
     "return LambdaLR(optimizer, [lambda s: lr_at(plan, min(s, plan.run_steps - 1), peak, eta_min) / peak] + "
     "[lambda s: 1.0] * (len(optimizer.param_groups) - 1))", LOOP),
    ("the wsd trunk restores the first parameter group's LR only", "train.py",
     "zip(self.optimizer.param_groups, self.scheduler.get_last_lr())",
     "zip(self.optimizer.param_groups[:1], self.scheduler.get_last_lr())", LOOP),
    ("--amp auto's margin inverted", "train.py", '"bf16" if figures["bf16"] > AMP_MARGIN * figures["none"]',
     '"bf16" if AMP_MARGIN * figures["bf16"] > figures["none"]',
     ACC + "test_amp_auto_takes_bf16_only_where_it_trains_at_least_the_margin_faster"),
    ("the gap against the baseline averages the baseline over seeds", "analysis/compare.py",
     "(accs[0][seed] - accs[1][seed]) - (accs[2][seed] - accs[3][seed])",
     "(accs[0][seed] - accs[1][seed]) - (np.mean(list(accs[2].values())) - np.mean(list(accs[3].values())))",
     "tests/test_analysis.py::test_the_gap_against_the_baseline_pairs_each_seed_with_the_baselines_same_seed"),
    ("every rank draws the same randomness", "methods/api.py", "return self.step, self.rank, self.micro",
     "return self.step, self.micro", M + "test_each_rank_draws_its_own_randomness_and_a_rank_the_same_again"),
    ("a sweep skips a finished run whose recipe changed", "launch.sh",
     'or bool(recipes and c.get("recipe_sha256") != sha)', "or False",
     "tests/test_launch.py::test_a_finished_run_whose_recipe_file_changed_is_not_skipped"),
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
            print(f"NOT APPLIED (text not found)  {name}", flush=True)
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
