"""A torchrun worker for the distributed tests: `instructkit ARGS` with one fault planted (the
faults cannot be had from the real command on demand):
  INSTRUCTKIT_TEST_PER_RANK_MEAN=1  the loss of a step is each rank's own mean, averaged over ranks
                                    (the bug of transformers #34191): the negative control;
  INSTRUCTKIT_TEST_FAIL=RANK:STEP   an exception on that rank at that step;
  argument "eval"                   prints the distributed validation loss of a tiny model as JSON."""

import json
import os
import sys

import torch


def main() -> int:
    import instructkit.train.loop as loop

    if os.environ.get("INSTRUCTKIT_TEST_PER_RANK_MEAN"):
        loop.global_token_count = lambda local, world, device: local * world.size
    if fail := os.environ.get("INSTRUCTKIT_TEST_FAIL"):
        import instructkit.train.fit as fit

        rank, step = (int(x) for x in fail.split(":"))
        real_step, calls = fit.optimizer_step, {"n": 0}

        def failing_step(session, *args, **kwargs):
            calls["n"] += 1
            if session.world.rank == rank and calls["n"] == step:
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            return real_step(session, *args, **kwargs)

        fit.optimizer_step = failing_step
    if sys.argv[1:] == ["eval"]:
        return distributed_eval()
    from instructkit.cli import main as cli

    return cli(sys.argv[1:])


def distributed_eval() -> int:
    from instructkit.data.pipeline import encode_splits, prepare_data
    from instructkit.data.prompts import ALPACA
    from instructkit.models.registry import load_model
    from instructkit.train import distributed
    from instructkit.train.loop import eval_batches, evaluate_loss

    world = distributed.init(torch.device("cpu"))
    loaded = load_model("tiny-gpt2", seed=4)
    val = encode_splits(prepare_data(os.environ["INSTRUCTKIT_TEST_DATA"]), ALPACA, loaded.tokenizer)["val"][0][:37]
    loss = evaluate_loss(loaded.model, val, eval_batches(val, 8, 100), loaded.tokenizer.pad_id, world=world)
    if world.is_main:
        print(json.dumps({"loss": loss, "world": world.size, "examples": len(val)}))
    distributed.finish(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
