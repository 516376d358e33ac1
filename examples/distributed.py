"""The sentiment run, data-parallel under Hugging Face Accelerate.

Launch one process per device (GPU, or CPU cores for a try-out)::

    accelerate launch --config_file examples/accelerate/multi_cpu.yaml \
        examples/distributed.py --smoke --out runs/distributed
    accelerate launch --config_file examples/accelerate/multi_gpu.yaml \
        examples/distributed.py --iterations 200 --out runs/distributed

Each process samples ``--prompts`` prompts of its own per iteration (so the
batch grows with the number of processes), gradients are averaged, and only
the main process writes metrics, samples, checkpoints and the plot. At the end
every process hashes its weights and the main process checks that they agree,
recording it in ``run.json``.
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

import kltune
from kltune.plots import plot_runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--model", default="embedded", help="'embedded', a hub id or a path")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per process per iteration")
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    return parser.parse_args()


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.smoke or not torch.cuda.is_available())
    if args.smoke:
        model, tokenizer = kltune.tiny_random_model("llama")
        new_tokens, reward_fn = 8, kltune.LengthReward(target_words=3)
    else:
        model, tokenizer = kltune.load_model(args.model)
        new_tokens, reward_fn = 20, kltune.VaderSentiment()
    torch.manual_seed(args.seed)  # the same value-head init on every process
    policy = kltune.Policy(model, tokenizer, value_head=True)
    blocks = kltune.Blocks(
        policy=policy,
        reference=kltune.FrozenReference(policy),
        reward_fn=reward_fn,
        objective=kltune.PPOObjective(),
        optimizer=torch.optim.Adam(policy.parameters(), lr=1e-4 if args.smoke else 1e-5),
    )
    state = kltune.LoopState(
        controller=kltune.AdaptiveKLController(beta=0.1, target=6.0),
        baseline=kltune.GAEBaseline(),
    )
    state = kltune.train(
        kltune.movie_review_prompts(),
        blocks,
        state,
        iterations=args.iterations,
        out_dir=args.out,
        prompts_per_iteration=args.prompts,
        sampling=kltune.Sampling(max_new_tokens=new_tokens, completions_per_prompt=2),
        updates=kltune.Updates(minibatch_size=args.prompts),  # 2 steps per iteration
        seed=args.seed,
        checkpoint_every=5,
        resume=args.resume,
        sample_every=5,
        accelerator=accelerator,
    )
    digests = gather_object([weights_digest(policy)])
    if accelerator.is_main_process:
        plot = plot_runs({"data-parallel": [args.out / "metrics.jsonl"]}, args.out / "curves.png")
        info = {
            "processes": accelerator.num_processes,
            "iterations": state.iteration,
            "final_beta": state.controller.beta,
            "weights_agree": len(set(digests)) == 1,
            "weight_digests": digests,
        }
        (args.out / "run.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2))
        print(f"wrote {plot}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
