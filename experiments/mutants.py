"""A mutation sweep: does the test suite catch real math bugs?

Each mutant is a bug a student copying a model file might make: an exact snippet of the code (it
must occur once in its file) replaced by a wrong one. For each, the sweep copies the repository (the
files `git ls-files` lists, as they are in the working tree) to a temporary folder, mutates the copy
and runs there the fast tests that should catch the bug, one pytest at a time:

    OMP_NUM_THREADS=1 python -m pytest -x -q -k TESTS test_models.py

killed: a test failed; survived: every selected test passed; error: no test ran (none selected, or
the mutant breaks the import) or they ran past --timeout. First the clean copy runs every mutant's
tests: a kill counts only by tests that pass without the bug. The repository is never changed.

    python experiments/mutants.py                   # about 24 minutes on 2 CPU cores
    python experiments/mutants.py --only 'vae_kl'   # the mutants whose names match a regex
    python experiments/mutants.py --wide --only X   # each against all its model's tests (minutes)

Results: experiments/results/mutants.json and .md (--wide: mutants_wide.*), merged by name into
what earlier sweeps stored.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --wide: every test of the mutated file's model but the multi-process ones, which check resume
# and failure handling, not math (a minute or two for a model, against seconds)
WIDE = {"ncsn.py": "ncsn", "vae.py": "vae or aasae", "ebm.py": "ebm",
        "common.py": "vae or bits", "experiments/measures.py": "probe or auroc or ood",
        "experiments/likelihood.py": "likelihood", "experiments/toys.py": "toy or mixture",
        "experiments/ncsn_inpaint.py": "inpaint", "experiments/ncsn_samplers.py": "ncsn",
        "experiments/aasae.py": "aasae", "experiments/ncsn_precision.py": "ncsn_precision",
        "experiments/ncsn_techniques.py": "ncsnv2_sampler_settings",
        "experiments/vae_precision.py": "vae_precision", "experiments/ebm_chains.py": "ebm_chains",
        "experiments/equal_time.py": "harness", "experiments/ncsn_laptop.py": "harness",
        "experiments/ebm_ood.py": "ebm_precision_and_ood", "experiments/vae_probe.py": "probe",
        "experiments/vae_interpolate.py": "vae_sample"}
NOT_WIDE = " and not (torchrun or rank_0 or one_writer or another_number or ranks_roll)"
NCSN_SAMPLERS = "ncsn_ode_sampler or ncsn_ncsnv2_sampler or ncsn_preview or ncsn_every_sampler_s"
VAE_LIKELIHOOD = "vae_discretized or vae_decoder_samples or vae_iwae_bound_is or vae_rgb_coupling"
TOY_TESTS = "toy_data_shapes or likelihood_ode_matches_mixture or ncsn_toy_experiment"
DATA = ("a_folder_is_shuffled or split_is_seeded or metric_pipeline or explore_and or "
        "odd_images")
CHAINS = "ebm_chains_measures or ebm_chains_locations"
EBM_MATH = "ebm_sgld_in or ebm_sgld_clips or ebm_replay or ebm_a_gradient or ebm_toy_energy"
# (name, bug, original snippet, mutated snippet, the tests that should catch it: pytest -k)
MUTANTS = {"ncsn.py": [
    ("ncsn_dsm_lambda_1", "DSM weighted by lambda(sigma) = 1, not sigma^2",
     "0.5 * (sigma * score + z).pow(2)", "0.5 * (score + z / sigma).pow(2)", "ncsn_dsm_loss"),
    ("ncsn_dsm_noise_sign", "DSM perturbs x - sigma z but scores against +z",
     "score_net(x + sigma * z,", "score_net(x - sigma * z,", "ncsn_dsm_loss"),
    ("ncsn_dsm_skips_sigma_L", "DSM draws levels 0..L-2: the smallest sigma is never trained",
     "torch.randint(len(sigmas),", "torch.randint(len(sigmas) - 1,", "ncsn_both_score"),
    ("ncsn_ald_score_sign", "flip the sign of the score in the Langevin step",
     "x = x + alpha * score +", "x = x - alpha * score +", NCSN_SAMPLERS),
    ("ncsn_ald_noise_sqrt_alpha", "Langevin noise sqrt(alpha), not sqrt(2 alpha)",
     "(2 * alpha).sqrt() * torch.randn_like(x)", "alpha.sqrt() * torch.randn_like(x)",
     NCSN_SAMPLERS),
    ("ncsn_ald_alpha_unsquared", "step size eps sigma_i / sigma_L, the ratio not squared",
     "alpha = eps * (sigma / sigmas[-1]) ** 2", "alpha = eps * (sigma / sigmas[-1])",
     NCSN_SAMPLERS),
    ("ncsn_ald_sigma_min_everywhere", "wrong sigma: the score at sigma_min at every level",
     "score = score_net(x, sigma.expand(len(x)))",
     "score = score_net(x, sigmas[-1].expand(len(x)))", NCSN_SAMPLERS),
    ("ncsn_ode_euler", "probability flow by Euler, not Heun (same cost counted)",
     "x = x + (sigma_next - sigma) * (d + slope(x_euler, sigma_next)) / 2",
     "x = x_euler + 0 * slope(x_euler, sigma_next)", NCSN_SAMPLERS),
    ("ncsn_ode_heun_same_sigma", "Heun's second slope taken at sigma, not sigma_next",
     "slope(x_euler, sigma_next)) / 2", "slope(x_euler, sigma)) / 2", NCSN_SAMPLERS),
    ("ncsn_tweedie_sigma", "Tweedie denoise step uses sigma instead of sigma^2",
     "x + sigma_min**2 * score_net(", "x + sigma_min * score_net(", "ncsn_final_denoising"),
    ("ncsn_start_variance_sigma", "the start's noise variance sigma_1, not sigma_1^2",
     "+ sigma_1**2 * torch.eye(", "+ sigma_1 * torch.eye(", NCSN_SAMPLERS),
    ("ncsn_sigmas_linear", "the sigma ladder linear, not geometric",
     "torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales))",
     "torch.linspace(sigma_max, sigma_min, num_scales)", "ncsn_geometric or ncsn_a_budget"),
    ("ncsn_ema_wrong_way", "EMA decay applied the wrong way round",
     "e.lerp_(p, 1 - d)", "e.lerp_(p, d)", "ncsn_ema"),
    ("ncsn_reseed_without_epoch", "every epoch reseeded alike: each epoch draws the same noise",
     "rank * 10**6 + epoch)  # each", "rank * 10**6)  # each",
     "ncsn and (resume_is_bit or every_epoch)"),
    ("ncsn_test_quarters_mixed", "the test DSM's quarters hold images at any level, not theirs",
     "levels = (edges[quarter] + u * (edges[quarter + 1] - edges[quarter])).long()",
     "levels = (u * len(sigmas)).long()", "ncsn_test_dsm_quarters or ncsn_sample_inpaint_and_eval"),
    ("ncsn_variance_ratio_gamma", "technique 4's carried-over excess with gamma, not gamma^2",
     "(1 - gamma**2 * shrink)", "(1 - gamma * shrink)", NCSN_SAMPLERS + " or ncsn_a_budget"),
    ("ncsn_start_without_mean", "the samplers' Gaussian start without the data's mean",
     "return lambda n: mean + (", "return lambda n: 0 * mean + (", NCSN_SAMPLERS),
    ("ncsn_embed_off_its_ladder", "a budget gives an 'embed' network sigmas it never learned",
     'if levels != args.num_scales and args.score_param == "embed":', "if False:",
     "ncsn_a_budget or ncsn_every_sampler"),
    ("ncsn_trajectory_not_reseeded", "trajectory.png's rows each from other starts and noise",
     "        torch.manual_seed(args.seed)  # the same draws, up to that level\n", "",
     "ncsn_sample_inpaint_and_eval"),
    ("ncsn_trajectory_rows_denoised", "trajectory.png's levels each denoised, as if the last",
     "denoise, out = sigmas[:levels].to(device), args.denoise and levels is None, []",
     "denoise, out = sigmas[:levels].to(device), args.denoise, []", "ncsn_sample_inpaint_and_eval"),
    # the run section (the same text in the three files: mutated in this one)
    ("run_resume_lr_ignored", "--lr given on resume ignored: the saved optimiser's lr kept",
     '    if args.lr != ckpt["args"]["lr"]:', "    if False:", "learning_rate_given and ncsn"),
    ("run_resume_scaler_not_loaded", "the loss scaler's state not restored on resume",
     '        scaler.load_state_dict(ckpt["scaler"])  # (in', "        pass  # (in",
     "resume_is_bit_identical_and and ncsn"),
    ("run_log_rows_not_purged", "a resume keeps the log rows after the checkpoint's step",
     'for r in rows if r["step"] <= step))', "for r in rows))", "crash_before and ncsn"),
    ("run_scaler_across_precisions", "a scaler's state loaded into a scaler of another precision",
     '    if ckpt["precision"] == str(amp_dtype(args, next(net.parameters()).device)):',
     "    if True:", "another_precision and ncsn"),
    ("run_moments_layout_kept", "the optimiser's moments kept in the checkpoint's memory layout",
     "optimizer.state[p][key] = torch.empty_like(p).copy_(value)",
     "optimizer.state[p][key] = value", "from_the_gpu and ncsn"),
    ("run_no_lock", "the run folder not locked: two writers at once",
     "fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass", "one_writer and ncsn"),
    ("run_tensorboard_not_purged", "a resume keeps TensorBoard's points past the checkpoint's step",
     "purge_step=step + 1 if step else None", "purge_step=None", "crash_before and ncsn"),
    ("run_config_not_inherited", "a command on a RUN ignores RUN/config.json (the defaults' width)",
     "p.set_defaults(**{k: v for k, v in saved.items() if k not in COMMANDS})", "pass",
     "resume_is_bit and ncsn"),
    ("ncsn_ddp_bypassed", "the step calls the network, not its DDP wrapper: ranks never average",
     "logs, bad = train_step(model, net,", "logs, bad = train_step(net, net,",
     "torchrun and ncsn"),
    ("ncsn_ema_no_warmup", "the EMA without its warm-up: d = decay from the first step",
     "    d = min(decay, (1 + step) / (10 + step))\n    for e, p in zip(ema.parameters(), "
     "net.parameters()):\n        e.lerp_(p, 1 - d)\n\n\ndef train_step",
     "    d = decay\n    for e, p in zip(ema.parameters(), net.parameters()):\n"
     "        e.lerp_(p, 1 - d)\n\n\ndef train_step", "ncsn_ema"),
], "vae.py": [
    ("vae_kl_no_half", "drop the 1/2 of the KL",
     "0.5 * (mu.pow(2) + logvar.exp()", "(mu.pow(2) + logvar.exp()", "vae_analytic_kl"),
    ("vae_kl_logvar_sign", "KL with + log sigma^2",
     "logvar.exp() - 1 - logvar)", "logvar.exp() - 1 + logvar)", "vae_analytic_kl"),
    ("vae_reparam_var_as_std", "reparameterisation z = mu + sigma^2 eps",
     "z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # the",
     "z = mu + logvar.exp() * torch.randn_like(mu)  # the",
     "vae_iwae_bound_k1 or vae_reparameterised"),
    ("vae_free_bits_clamp_max", "free bits clamp max instead of min",
     ".clamp(min=free_nats)", ".clamp(max=free_nats)", "vae_free_bits"),
    ("vae_free_bits_per_image", "free bits per image, not on the batch-average KL",
     "kl.mean(0).clamp(min=free_nats).sum()", "kl.clamp(min=free_nats).mean(0).sum()",
     "vae_free_bits or vae_kl_weight"),
    ("vae_free_bits_per_latent", "lambda per latent used as lambda per channel map",
     "args.free_bits * args.latent_size**2", "args.free_bits", "vae_free_bits or vae_kl_weight"),
    ("vae_kl_warmup_in_steps", "KL warm-up counted in steps, not epochs",
     "(args.kl_warmup * steps_per_epoch)", "args.kl_warmup", "vae_kl_weight"),
    ("vae_bin_edge_256", "off-by-one bin edge 1/255 -> 1/256",
     "(centred + 1 / 255), inv_scale * (centred - 1 / 255)",
     "(centred + 1 / 256), inv_scale * (centred - 1 / 256)", VAE_LIKELIHOOD),
    ("vae_edge_bins_closed", "the edge bins closed: 0 and 255 get an interior bin",
     "torch.where(x < -0.999, F.logsigmoid(upper)", "torch.where(x < -1.5, F.logsigmoid(upper)",
     VAE_LIKELIHOOD),
    ("vae_coupling_on_mean", "G's mean moves with R's mean, not the true R",
     "means[:, 1] + coeffs[:, 0] * x[:, 0]", "means[:, 1] + coeffs[:, 0] * means[:, 0]",
     VAE_LIKELIHOOD),
    ("vae_coupling_b_swapped", "B's coefficients of R and G swapped",
     "coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]",
     "coeffs[:, 1] * x[:, 1] + coeffs[:, 2] * x[:, 0]", VAE_LIKELIHOOD),
    ("vae_mixture_no_softmax", "mixture weights unnormalised (logits, not log-softmax)",
     "log_bin.sum(1) + torch.log_softmax(logits, dim=1)", "log_bin.sum(1) + logits",
     VAE_LIKELIHOOD),
    ("vae_iwae_log_chunk", "IWAE log-mean uses log K wrong (log of the chunk)",
     "dim=0) - math.log(k)", "dim=0) - math.log(chunk)", "vae_iwae"),
    ("vae_iwae_mean_of_logs", "IWAE averages the log-weights (the ELBO again)",
     "torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)", "torch.cat(log_w).mean(0)",
     "vae_iwae"),
    ("vae_outlier_factor_ignored", "outliers clipped to the average, not skip-factor x it",
     "bound = args.skip_factor * average", "bound = average", "vae_non_finite"),
    ("vae_outlier_avg_uncapped", "the running average takes an outlier uncapped",
     "0.01 * grad_norm.clamp(max=bound)", "0.01 * grad_norm", "vae_non_finite or vae_an_outlier"),
    ("vae_ema_wrong_way", "EMA decay applied the wrong way round",
     "e.lerp_(p, 1 - d)", "e.lerp_(p, d)", "vae and (ema_update or logs or sample)"),
    ("vae_bad_steps_total", "bad steps counted in total, not in a row",
     "(streak + 1) * bad", "streak + bad", "vae and (non_finite or only_bad_steps)"),
    ("vae_lr_warmup_from_zero", "the lr warm-up starts at 0: the first step does nothing",
     "args.lr * min(1.0, (step + 1) / max(1.0, args.warmup_steps))",
     "args.lr * min(1.0, step / max(1.0, args.warmup_steps))", "vae_kl_weight_zero"),
    ("vae_mean_without_coupling", "E[x|z]'s G ignores its coupling to R",
     "g = means[:, 1] + coeffs[:, 0] * r", "g = means[:, 1]",
     "vae_means_are or vae_decoder_samples"),
    ("vae_mean_unweighted", "E[x|z] averages the components without their weights",
     "(weights * c).sum(1) for c in (r, g, b)", "c.mean(1) for c in (r, g, b)",
     "vae_means_are or vae_decoder_samples"),
    ("vae_ddp_bypassed", "the step calls the network, not its DDP wrapper: ranks never average",
     "logs, bad = train_step(model, net,", "logs, bad = train_step(net, net,", "torchrun and vae"),
], "ebm.py": [
    ("ebm_cd_sign", "CD loss E(x-) - E(x+): data energy pushed up",
     "energy_pos.mean() - energy_neg.mean()", "energy_neg.mean() - energy_pos.mean()",
     "ebm_a_gradient"),
    ("ebm_alpha_positives_only", "alpha's penalty on E(x+)^2 only",
     "(energy_pos**2).mean() + (energy_neg**2).mean()", "(energy_pos**2).mean()", "ebm_a_gradient"),
    ("ebm_no_dequantization", "no dequantization noise",
     "(x * 255 + torch.rand_like(x)) / 256", "x",
     "ebm_trains or ebm_training_chains or ebm_positives"),
    ("ebm_sgld_grad_sign", "SGLD climbs the energy",
     "move = -step_size * grad", "move = step_size * grad", EBM_MATH),
    ("ebm_sgld_noise_variance", "SGLD noise std noise^2 (variance for std)",
     "+ noise * torch.randn_like(x)", "+ noise**2 * torch.randn_like(x)", EBM_MATH),
    ("ebm_sgld_no_clip", "SGLD gradient clip dropped",
     "grad = torch.nan_to_num(grad).clamp(-grad_clip, grad_clip)", "grad = torch.nan_to_num(grad)",
     EBM_MATH),
    ("ebm_sgld_mask_ignored", "inpainting's SGLD moves the observed pixels too",
     "(move if mask is None else move * mask)", "move", "ebm_sgld_clips"),
    ("ebm_sgld_mask_inverted", "inpainting's SGLD moves the observed pixels, not the hidden",
     "(move if mask is None else move * mask)", "(move if mask is None else move * (1 - mask))",
     "ebm_sgld_clips"),
    ("ebm_samples_noise_ignored", "--chains noise ignored: every chain from the replay buffer",
     'if args.chains == "buffer" else torch.rand(n, 3, 32, 32)',
     "if True else torch.rand(n, 3, 32, 32)", "ebm_samples_start"),
    ("ebm_samples_one_saved_chain", "every chain started at the same saved chain",
     "saved[torch.randperm(len(saved)).repeat(math.ceil(n / len(saved)))[:n]]",
     "saved[torch.zeros(n, dtype=torch.long)]", "ebm_samples_start"),
    ("ebm_sgld_no_clamp", "SGLD chains not clamped to [0, 1]",
     "x = x if bounds is None else x.clamp(*bounds)", "x = x", EBM_MATH),
    ("ebm_detach_negatives", "forget to detach the SGLD negatives (grad_x E keeps its graph)",
     "x)[0].float() / 1024", "x, create_graph=True)[0].float() / 1024",
     EBM_MATH + " or ebm_sgld_negatives"),
    ("ebm_grad_scale_kept", "grad_x E scaled by 1024 for float16 and not scaled back",
     "x)[0].float() / 1024", "x)[0].float()", EBM_MATH),
    ("ebm_restart_rate_ignored", "replay buffer restart probability ignored (always 5%)",
     "< self.restart_rate", "< 0.05", EBM_MATH + " or ebm_chains"),
    ("ebm_buffer_not_pushed", "chains never pushed back: no persistence",
     "    buffer.push(x_neg, idx)\n", "",
     "ebm_training_chains or ebm_resumes_on or ebm_chains_persist"),
    ("ebm_clip_bias_late", "IGEBM clip's bias correction one step late",
     "beta2 ** (state[\"step\"] + 1)", "beta2 ** state[\"step\"]", "ebm_gradient_clip"),
    ("ebm_energy_bound_not_skipped", "a step with |E| > --max-energy is not skipped",
     "scaler.scale(loss * torch.where(bad, math.nan, 1.0))", "scaler.scale(loss)",
     "ebm and (non_finite or divergence or rollback or a_step_whose)"),
    ("ebm_ema_wrong_way", "EMA decay applied the wrong way round",
     "e.lerp_(p, 1 - d)", "e.lerp_(p, d)", "ebm_ema"),
    ("ebm_clip_sgd", "IGEBM's clip applied to an optimiser with no Adam state: every SGD "
     "gradient entry clipped to +-0.1", 'optimizer.param_groups if "betas" in g)',
     "optimizer.param_groups)", "ebm_gradient_clip"),
    ("ebm_rollback_lr_kept", "a rollback keeps the lr", 'param_groups[0]["lr"] * args.lr_drop',
     'param_groups[0]["lr"] * 1.0', "ebm_divergence"),
    ("ebm_buffer_share_first", "a resumed rank takes the first chains whatever its rank",
     "mine = torch.arange(rank * n, (rank + 1) * n) % len(saved)",
     "mine = torch.arange(0, n) % len(saved)", "ebm_resumes_on"),
    ("ebm_ddp_bypassed", "the step calls the network, not its DDP wrapper: ranks never average",
     "logs, bad = train_step(model, net,", "logs, bad = train_step(net, net,", "torchrun and ebm"),
    ("ebm_bad_not_all_reduced", "each rank counts its own bad steps: ranks may roll back apart",
     "        dist.all_reduce(bad, op=dist.ReduceOp.MAX)", "        pass",
     "ebm and (torchrun or another_number or rank_0 or ranks_roll)"),
    ("ebm_group_kept_alive", "torch.distributed.nn imported after the group (by DDP): its threads "
     "outlive destroy_process_group and can abort the exit",
     '        importlib.import_module("torch.distributed.nn")\n', "", "torchrun and ebm"),
], "common.py": [
    ("common_bpd_in_nats", "bits/dim without the ln 2 (nats per dim)",
     "nll_nats / (dims * math.log(2))", "nll_nats / dims", "bits_per_dim or vae_uniform"),
    ("loader_flip_always", "images flipped even with flip=False (the EBM, as IGEBM)",
     "            if self.flip:\n", "            if True:\n", "device_loader_sees"),
    ("loader_same_shard", "every rank takes rank 0's shard of the data",
     "shard = slice(self.rank, self.shard_size", "shard = slice(0, self.shard_size",
     "device_loader_ddp"),
    ("loader_epoch_unseeded", "the data order seeded without the epoch: every epoch alike",
     "manual_seed(self.seed * 1_000_003 + epoch)", "manual_seed(self.seed * 1_000_003)",
     "device_loader_sees"),
    ("data_key_without_mtime", "the cache key ignores when a file changed: an image rewritten at "
     "the same size keeps its stale decoded copy", "|{st.st_size}|{st.st_mtime_ns}",
     "|{st.st_size}", DATA),
    ("hold_out_unseeded", "the 5% hold-out drawn afresh for each split: test images leak into "
     "training", "torch.randperm(len(files), generator=torch.Generator().manual_seed(0))",
     "torch.randperm(len(files))", DATA),
    ("decode_unshuffled", "a folder's images kept in class order: --limit-train N sees one class",
     "torch.randperm(len(images), generator=torch.Generator().manual_seed(0))",
     "torch.arange(len(images))", DATA),
    ("labels_out_of_step", "the images shuffled but not their labels",
     "torch.tensor(labels)[order]", "torch.tensor(labels)", DATA),
    ("crop_not_centred", "the crop to 32x32 from the corner, not the centre",
     "left, top = (w - 32) // 2, (h - 32) // 2", "left, top = 0, 0", DATA),
    ("fid_cache_shared", "every dataset's reference statistics cached under one name",
     'input2_cache_name=data_key(data, "train"),', 'input2_cache_name="train",', DATA),
    ("explore_mean_over_rows", "the exploration's channel means taken over rows, not channels",
     "x.mean((0, 2, 3)).tolist()", "x.mean((0, 1, 3)).tolist()", DATA),
], "experiments/toys.py": [
    ("toys_blur_variance_sigma", "the blurred mixture's variance std^2 + sigma, not + sigma^2",
     "var = MIXTURE_STD**2 + sigma**2", "var = MIXTURE_STD**2 + sigma", TOY_TESTS),
    ("toys_normaliser_one_dimension", "the 2-D Gaussian's normaliser written for one dimension",
     "- torch.log(2 * math.pi * var), dim=1)", "- 0.5 * torch.log(2 * math.pi * var), dim=1)",
     TOY_TESTS),
], "experiments/ncsn_inpaint.py": [
    ("inpaint_observation_not_restored", "the observed pixels left as the sampler's last state",
     "return torch.where(mask, observed, x)", "return x", "inpaint"),
    ("inpaint_alpha_unsquared", "Alg. 2's step size eps sigma_i / sigma_L, not squared",
     "alpha = eps * (sigma / sigmas[-1]) ** 2", "alpha = eps * sigma / sigmas[-1]", "inpaint"),
], "experiments/ncsn_samplers.py": [
    ("pc_corrector_noise_sqrt_step", "the corrector's noise sqrt(step), not sqrt(2 step)",
     "(2 * step).sqrt() * z", "step.sqrt() * z", "predictor_corrector"),
    ("pc_predictor_noise_variance", "the predictor's noise scaled by its variance, not its std",
     "variance.sqrt() * torch.randn_like(x)", "variance * torch.randn_like(x)",
     "predictor_corrector"),
    ("pc_snr_unsquared", "the corrector's step (snr |z| / |s|), not its square",
     "/ score.flatten(1).norm(dim=1).mean()) ** 2", "/ score.flatten(1).norm(dim=1).mean())",
     "predictor_corrector"),
], "experiments/aasae.py": [
    ("aasae_never_jittered", "SimCLR's colour jitter never applied (p = 0.8)",
     "< 0.8, jittered, x)", "< 0.0, jittered, x)", "aasae_views"),
    ("aasae_crop_area_fixed", "the crop's area always the smallest, 8%",
     "area, ratio = 0.08 + 0.92 * u()", "area, ratio = 0.08 + 0.0 * u()", "aasae_views"),
], "experiments/ncsn_precision.py": [
    ("ncsn_precision_stale", "the harness behind the model file: load_trained's pair read as one",
     "net, _ = ncsn.load_trained(", "net = ncsn.load_trained(", "ncsn_precision_experiment"),
], "experiments/ncsn_techniques.py": [
    ("technique4_a_to_the_t", "NCSNv2's ratio with (1 - b)^T, not (1 - b)^(2T)",
     "(1 - b) ** (2 * steps)", "(1 - b) ** steps", "ncsnv2_sampler_settings"),
    ("technique4_c_dropped", "NCSNv2's ratio without its stationary term c",
     "* (gamma**2 - c) + c", "* gamma**2", "ncsnv2_sampler_settings"),
], "experiments/vae_precision.py": [
    ("vae_precision_stale", "the harness behind the model file: load_trained's pair read as one",
     "net, _ = vae.load_trained(", "net = vae.load_trained(", "vae_precision_experiment"),
], "experiments/measures.py": [
    ("probe_test_standardised_alone", "the test set standardised by its own statistics",
     "train_x, test_x = (train_x - mean) / std, (test_x - mean) / std",
     "train_x, test_x = (train_x - mean) / std, (test_x - test_x.mean(0)) / test_x.std(0)",
     "linear_probe"),
    ("probe_scored_on_training_set", "the probe scored on the images it was fitted to",
     'return {"top1": accuracy(w, test_x, test_y)', 'return {"top1": accuracy(w, train_x, train_y)',
     "linear_probe"),
    ("probe_l2_chosen_on_test", "the probe's l2 chosen by its test accuracy",
     "return accuracy(w, train_x[n:], train_y[n:])", "return accuracy(w, test_x, test_y)",
     "linear_probe"),
    ("auroc_tie_counts_one", "a tie counts as a win, not half", "(below + not_above).sum()",
     "(2 * not_above).sum()", "auroc"),
], "experiments/likelihood.py": [
    ("likelihood_bpd_255_bins", "bits/dim with 255 bins a dimension, not 256",
     "dims * math.log(256) - log_p", "dims * math.log(255) - log_p", "likelihood_bits"),
    ("likelihood_dequantise_255", "dequantised points (k + u) / 255: out of their bins",
     "(images.double() + u) / 256", "(images.double() + u) / 255", "likelihood_dequantised"),
    ("likelihood_hutchinson_one_probe", "Hutchinson's eps^T J eps without its second eps",
     "(eps_jacobian * probe).flatten(1).sum(1)", "eps_jacobian.flatten(1).sum(1)",
     "likelihood_hutchinson"),
    ("likelihood_drift_sigma", "the ODE's drift in log sigma -sigma s, not -sigma^2 s",
     "(-sigma**2 * s).flatten()", "(-sigma * s).flatten()", "likelihood_ode"),
    ("likelihood_divergence_sign", "the divergence integral with the wrong sign",
     "(sigma**2 * div).double()", "(-sigma**2 * div).double()", "likelihood_ode"),
    ("likelihood_prior_variance_sigma", "the prior's variance sigma_max, not sigma_max^2",
     "** 2).sum(1) / sigma_max**2", "** 2).sum(1) / sigma_max", "likelihood_ode"),
    ("mala_backward_drift_sign", "MALA's reverse proposal with the drift's sign flipped",
     "(x - y + step * beta * grad_y)", "(x - y - step * beta * grad_y)",
     "likelihood_mala or likelihood_ais"),
    ("mala_box_ignored", "MALA accepts moves out of the box, where the target is 0",
     "accept = inside & (u.log() < log_ratio)", "accept = u.log() < log_ratio",
     "likelihood_mala or likelihood_ais"),
    ("ais_base_unnormalised", "AIS's base density uniform but not normalised (no log volume)",
     "(beta - beta_before) * (log_volume - e.double())", "(beta - beta_before) * (-e.double())",
     "likelihood_ais"),
    ("ais_log_sum_exp", "log Z as log sum w, not log mean w",
     "torch.logsumexp(log_w, 0) - math.log(len(log_w))).item()",
     "torch.logsumexp(log_w, 0)).item()", "likelihood_ais"),
    ("likelihood_vae_row_nats", "the VAE's row in nats per dimension: no ln 2",
     "bits = -log_p / (IMAGE_DIMS * math.log(2))", "bits = -log_p / IMAGE_DIMS", "likelihood_rows"),
    ("likelihood_ebm_log_z_sign", "the EBM's row adds log Z instead of subtracting it",
     "bits_per_dim_from_density(-e - log_z)", "bits_per_dim_from_density(-e + log_z)",
     "likelihood_rows"),
    ("likelihood_ncsn_pixels", "NCSN's ODE run from the pixels k / 255, not dequantised points",
     "x = dequantise(batch, g).float().to(device)", "x = (batch.double() / 255).float().to(device)",
     "likelihood_rows"),
    ("likelihood_held_out_train", "the held-out images taken from the training split",
     'common.load_images(args.data, args.data_root, "test")[:n]',
     'common.load_images(args.data, args.data_root, "train")[:n]', "likelihood_rows"),
    ("grid_cell_area_h", "the quadrature's cell area h, not h^2", "+ 2 * math.log(h)).item()",
     "+ math.log(h)).item()", "likelihood_ais"),
], "experiments/ebm_chains.py": [
    ("chains_ring_density_unscaled", "the rings' density with I0, not the scaled i0e: no longer a "
     "density", "torch.special.i0e(radius * k / var)", "torch.special.i0(radius * k / var)",
     CHAINS),
    ("chains_location_not_in_stds", "a mode's shift in data units, not in the data's stds",
     "location.append((where[0] - where[1]).norm().item() / STD[name])",
     "location.append((where[0] - where[1]).norm().item())", CHAINS),
    ("chains_covered_full_weight", "a mode covered only at its full weight, not a quarter of it",
     "(q_modes >= p_modes / 4)", "(q_modes >= p_modes)", CHAINS),
    ("chains_sample_shares_over_all", "the samples' mode shares taken over every point, off-mode "
     "ones too", "in_modes = counts[:-1] / counts[:-1].sum().clamp(min=1)",
     "in_modes = counts[:-1] / counts.sum()", CHAINS),
    ("chains_ring_radius_unclamped", "a point's distance to a ring of radius 0 or 4, which does "
     "not exist", "radius.round().clamp(1, 3)", "radius.round()", CHAINS),
], "experiments/ebm_ood.py": [
    ("ood_auroc_of_energy", "the OOD table's AUROC of E, not of -E (the log-likelihood's sign)",
     'measures.auroc(-energy["test images"], -energy[name])',
     'measures.auroc(energy["test images"], energy[name])', "ebm_precision_and_ood"),
], "experiments/vae_interpolate.py": [
    ("interpolate_same_end", "the path from a code to itself: t mu_0 for t mu_1",
     "(1 - t) * mu[0] + t * mu[1]", "(1 - t) * mu[0] + t * mu[0]", "vae_sample_interpolate"),
    ("interpolate_encoder_unscaled", "the encoder given pixels in [0, 1], not [-1, 1]",
     "net.encode(ends * 2 - 1)[0]", "net.encode(ends)[0]", "vae_sample_interpolate"),
    ("interpolate_uneven_steps", "the steps bunched at the ends: t^2 for t",
     "t = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1)",
     "t = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1) ** 2",
     "vae_sample_interpolate"),
    ("interpolate_samples", "samples of p(x|z) along the path, not its means E[x|z]",
     "t * mu[1], drawn=False)", "t * mu[1], drawn=True)", "vae_sample_interpolate"),
], "experiments/vae_probe.py": [
    ("probe_pixels_0_1", "the probe's encoder given pixels in [0, 1], not [-1, 1] as in training",
     "args.batch_size].to(device).float() / 127.5 - 1", "args.batch_size].to(device).float() / 255",
     "vae_probe_reads"),
    ("probe_reads_logvar", "the probe's features the posterior's log-variance, not its mean",
     "out.append(net.encode(x)[0].flatten(1).float())",
     "out.append(net.encode(x)[1].flatten(1).float())", "vae_probe_reads"),
], "experiments/equal_time.py": [
    ("harness_child_output_dropped", "a harness's child's output thrown away: a failure without "
     "its reason", "stdout=f,\n", "stdout=subprocess.DEVNULL,\n", "harness_children"),
], "experiments/ncsn_laptop.py": [
    ("laptop_report_needs_runs", "the laptop report reads every run its record names, present or "
     "not", 'if (run / "checkpoint.pt").exists():', "if True:", "harness_children"),
], "experiments/bench.py": [
    ("bench_flag_renamed", "a flag renamed while a docstring still prints the old name: "
     "--memory-format as --layout", 'p.add_argument("--memory-format",',
     'p.add_argument("--layout",', "documented_command"),
]}


def copy_repository(dest):
    """The files git tracks, as they are in the working tree, copied to dest."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run_tests(folder, expression, timeout):
    """(status, the first failing test, pytest's last line, seconds) of the tests selected."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-k", expression, "test_models.py"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", "", f"timeout after {timeout} s", time.perf_counter() - start
    seconds, lines = time.perf_counter() - start, proc.stdout.strip().splitlines()
    failed = next((line.split()[1] for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    # pytest's exit status: 0 all passed, 1 some failed; 2-5 interrupted, internal, usage, none ran
    status = {0: "survived", 1: "killed"}.get(proc.returncode, "error")
    return status, failed.removeprefix("test_models.py::"), lines[-1] if lines else "", seconds


def write_results(rows, path, command):
    """path.json and path.md: these rows merged, by name, into what earlier sweeps stored."""
    order = [m[1] for m in ALL]
    old = json.loads(path.with_suffix(".json").read_text())["mutants"] if path.with_suffix(
        ".json").exists() else []
    merged = {r["name"]: r for r in [*old, *rows] if r["name"] in order}
    rows = sorted(merged.values(), key=lambda r: order.index(r["name"]))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("killed", "survived", "error")}
    path.with_suffix(".json").write_text(json.dumps(
        {"counts": counts, "command": command, "mutants": rows}, indent=2) + "\n")
    table = ["| mutant | bug | status | caught by | s |", "|---|---|---|---|---|"]
    cells = [(r["name"], r["bug"].replace("|", "&#124;"), r["status"], r["killed_by"],
              f"{r['seconds']:.0f}") for r in rows]  # (a | in a bug would split its cell)
    table += ["| " + " | ".join(row) + " |" for row in cells]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    path.with_suffix(".md").write_text(f"`{command}`: {summary} of {len(rows)} mutants\n\n"
                                       + "\n".join(table) + "\n")
    return counts


ALL = [(file, *m) for file, mutants in MUTANTS.items() for m in mutants]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run the mutants whose names match this regex")
    p.add_argument("--wide", action="store_true", help="all the model's tests, not the named ones")
    p.add_argument("--timeout", type=int, default=600, help="seconds for one mutant's tests")
    args = p.parse_args(argv)
    assert len({m[1] for m in ALL}) == len(ALL), "two mutants share a name"
    chosen = [(file, name, bug, original, mutated, WIDE[file] + NOT_WIDE if args.wide else tests)
              for file, name, bug, original, mutated, tests in ALL if re.search(args.only, name)]
    if not chosen:
        sys.exit(f"no mutant's name matches {args.only!r}")
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        clean = Path(tmp) / "clean"  # one snapshot: edits made during the sweep do not leak in
        copy_repository(clean)
        union = " or ".join(sorted({f"({m[-1]})" for m in chosen}))
        status, failed, last, seconds = run_tests(clean, union, 10 * args.timeout)
        print(f"clean copy: {last} ({seconds:.0f} s)", flush=True)
        assert status == "survived", f"the clean copy fails its tests ({failed}): {last}"
        for file, name, bug, original, mutated, tests in chosen:
            folder = Path(tmp) / name
            shutil.copytree(clean, folder)
            text = (folder / file).read_text()
            assert text.count(original) == 1, f"{name}: {original!r} is not once in {file}"
            (folder / file).write_text(text.replace(original, mutated))
            status, failed, last, seconds = run_tests(folder, tests, args.timeout)
            shutil.rmtree(folder)
            rows.append({"name": name, "file": file, "bug": bug, "tests": tests, "status": status,
                         "killed_by": failed, "pytest": last, "seconds": round(seconds, 1)})
            print(f"{status:9} {seconds:4.0f} s  {name:30} {failed or last}", flush=True)
    command = "python experiments/mutants.py" + " --wide" * args.wide
    path = ROOT / "experiments" / "results" / ("mutants_wide" if args.wide else "mutants")
    counts = write_results(rows, path, command)
    print(f"stored results: {counts}; this sweep: {len(rows)} mutants in "
          f"{time.perf_counter() - start:.0f} s ({path}.json)")


if __name__ == "__main__":
    main()
