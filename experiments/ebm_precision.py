"""Does bf16 autocast change SGLD's moves? experiments/README.md, "bf16 against float32 in the
sampler".

    OMP_NUM_THREADS=1 python -m experiments.ebm_precision runs/RUN --n 256

On a trained run (ebm.py's checkpoint), on the CPU (bf16 autocast works there: torch.autocast("cpu",
dtype=torch.bfloat16)), it compares grad_x E under bf16 autocast with float32 on the states SGLD
visits (the run's replay buffer), on test images and on uniform noise (where chains start); in the
units that matter to SGLD: the move step * clip(grad_x E, +-clip) against the clip's largest move
(10 * 0.01 = 0.1 per pixel) and the noise added at every step (0.005). The network is in eval mode
(no dropout) so that only precision differs. Yardstick: two float32 evaluations with dropout on
(as the training chains run) differ by their dropout masks; IGEBM's training accepts that much. Then
whole chains: --steps SGLD steps from the same start with the same noise, bf16 against float32, and
two float32 chains with different noise for scale. Writes RUN/precision.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import common
import ebm


def input_gradient(net, x, dtype):
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        energy = net(x).float()
    return torch.autograd.grad(energy.sum(), x)[0], energy.detach()


def move(grad, args):
    return args.sgld_step_size * grad.clamp(-args.sgld_grad_clip, args.sgld_grad_clip)


def compare_moves(net, x, args):
    """bf16 vs float32 (dropout off), and float32 vs float32 with two dropout masks, on the states
    x."""
    net.eval()
    g32, e32 = input_gradient(net, x, torch.float32)
    g16, e16 = input_gradient(net, x, torch.bfloat16)
    net.train()  # dropout on: two masks
    torch.manual_seed(1)
    g_a, _ = input_gradient(net, x, torch.float32)
    torch.manual_seed(2)
    g_b, _ = input_gradient(net, x, torch.float32)
    net.eval()
    m32, m16, m_a, m_b = (move(g, args) for g in (g32, g16, g_a, g_b))
    bf16, dropout = (m16 - m32).abs(), (m_a - m_b).abs()
    return {"n": len(x),
            "grad_relative_l2_error":
                ((g16 - g32).flatten(1).norm(dim=1) / g32.flatten(1).norm(dim=1)).median().item(),
            "energy_abs_error": (e16 - e32).abs().mean().item(), "energy_std": e32.std().item(),
            "pixels_clipped": (g32.abs() >= args.sgld_grad_clip).float().mean().item(),
            "grad_sign_flips": (g16.sign() != g32.sign()).float().mean().item(),
            "move_abs_diff_mean": bf16.mean().item(),
            "move_abs_diff_p99": bf16.flatten().quantile(0.99).item(),
            "move_diff_over_noise": (bf16 > args.sgld_noise).float().mean().item(),
            "dropout_move_abs_diff_mean": dropout.mean().item(),
            "dropout_move_diff_over_noise": (dropout > args.sgld_noise).float().mean().item(),
            "move_abs_mean": m32.abs().mean().item()}


def chains(net, x0, args, steps):
    """Final states of SGLD from x0: float32, bf16 with the same noise, float32 with other noise."""
    net.eval()
    out = {}
    for name, dtype, seed in (("float32", None, 0), ("bf16", torch.bfloat16, 0),
                              ("float32_other_noise", None, 1)):
        torch.manual_seed(seed)  # the chains' noise
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            x, _ = ebm.sgld(lambda v: net(v).float(), x0, steps, args.sgld_step_size,
                            args.sgld_noise, args.sgld_grad_clip)
        out[name] = (x, time.process_time() - start)
    with torch.no_grad():
        energy = {k: net(x).mean().item() for k, (x, _) in out.items()}
    diff = lambda a, b: (out[a][0] - out[b][0]).abs().mean().item()  # noqa: E731
    return {"steps": steps, "n": len(x0), "final_abs_diff_bf16": diff("bf16", "float32"),
            "final_abs_diff_other_noise": diff("float32_other_noise", "float32"),
            "final_energy": energy, "cpu_seconds": {k: s for k, (_, s) in out.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder of ebm.py")
    p.add_argument("--n", type=int, default=256, help="states per set")
    p.add_argument("--steps", type=int,
                   help="SGLD steps of the whole chains (default: the run's K)")
    p.add_argument("--chains", type=int, default=64, help="chains for the whole-chain comparison")
    cli = p.parse_args(argv)
    torch.set_num_threads(1)
    args = ebm.parse_args(["--sample", cli.run, "--device", "cpu"])
    net, state = ebm.load_trained(cli.run, args, torch.device("cpu"))
    buffer = state["buffer"]
    g = torch.Generator().manual_seed(0)
    sets = {"replay buffer (what SGLD visits)":
                buffer[torch.randperm(len(buffer), generator=g)[:cli.n]],
            "test images":
                (common.load_images(args.data, args.data_root, "test")[:cli.n].float() + 0.5) / 256,
            "uniform noise (chain starts)": torch.rand(cli.n, 3, 32, 32, generator=g)}
    result = {"run": cli.run, "sgld": {"step": args.sgld_step_size, "clip": args.sgld_grad_clip,
                                       "noise": args.sgld_noise},
              "moves": {name: compare_moves(net, x, args) for name, x in sets.items()},
              "chains": chains(net, sets["uniform noise (chain starts)"][:cli.chains], args,
                               cli.steps or args.sgld_steps)}
    (Path(cli.run) / "precision.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
