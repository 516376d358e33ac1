"""Run under ``accelerate launch --num_processes 2`` by test_distributed.py (``cpu``: gloo;
``cuda``: one GPU per process).

One PPO update on a fixed batch of 8 completions: each of the two
processes takes 4 rows (data-parallel, through kltune.distributed.prepare);
process 0 then repeats it alone on all 8 rows with the plain blocks. Writes the
weights of both runs, and each process's own, for the test to compare.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import kltune
from helpers import tiny_blocks
from kltune.loop import (
    compute_scores,
    estimate_advantages,
    estimate_kl,
    optimise,
    score_reference,
    shape_with_kl,
)

PROMPTS = ["The movie", "A film about", "I think", "Acting"]


def fixed_rollout(blocks: kltune.Blocks) -> kltune.Rollout:
    """8 completions of 6 tokens, none ended early (equal token counts per process)."""
    for seed in range(100):
        rollout = blocks.policy.rollout(
            PROMPTS,
            max_new_tokens=6,
            completions_per_prompt=2,
            generator=torch.Generator().manual_seed(seed),
        )
        if bool(rollout.response_mask.all()):
            return rollout
    raise AssertionError("no seed gave 8 full-length completions")


def one_update(blocks: kltune.Blocks, state: kltune.LoopState, rollout: kltune.Rollout) -> None:
    rollout = score_reference(blocks.reference, rollout)
    rollout = compute_scores(blocks.reward_fn, rollout)
    kl_tokens = estimate_kl(blocks.policy, rollout, blocks.objective.kl)
    rollout = shape_with_kl(rollout, kl_tokens, blocks.objective.kl, state.controller.beta)
    rollout = estimate_advantages(state.baseline, rollout)
    buffer = kltune.RolloutBuffer(rollout).whitened(all_reduce=blocks.data_parallel.all_reduce)
    updates = kltune.Updates(minibatch_size=len(rollout), epochs=2)
    optimise(blocks, buffer, state.controller.beta, updates, torch.Generator(), state)


def _blocks(device: torch.device) -> tuple[kltune.Blocks, kltune.LoopState]:
    return tiny_blocks(value_head=True, baseline=kltune.GAEBaseline(), device=device)


def _weights(blocks: kltune.Blocks) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in blocks.policy.state_dict().items()}


def main(out: Path, device: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=device == "cpu")  # CUDA: one GPU per process, NCCL
    rank, world = accelerator.process_index, accelerator.num_processes
    blocks, state = _blocks(accelerator.device)
    rollout = fixed_rollout(blocks)  # identical on every process: same weights, same seed
    rows = len(rollout) // world
    prepared = kltune.distributed.prepare(blocks, accelerator)
    one_update(prepared, state, rollout.select(slice(rank * rows, (rank + 1) * rows)))
    save_file(_weights(blocks), str(out / f"rank{rank}.safetensors"))
    if accelerator.is_main_process:
        alone, state = _blocks(accelerator.device)
        one_update(alone, state, rollout)
        save_file(_weights(alone), str(out / "single.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
