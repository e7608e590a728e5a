"""Calibration across processes with torch.distributed (gloo, CPU): each process runs the model on its
share of the calibration stories and accumulates every head's Grams through forward hooks; the Grams are
all-reduced -- summed in float64, token counts summed, largest magnitudes max-reduced -- and every process
then holds the calibration of all the stories, exactly (sums of x^T x), and fits the same projections.

    python3 examples/python/distributed_calibration.py --world-size 2 \\
        --model data/models/tinyllama-h64/model.bin --tokenizer data/models/tinyllama-h64/tok512.bin \\
        --text data/text/tinystories/tinystories_sample.txt --calib-stories 0:40 --rank 32 --out proj.safetensors

On a cluster, launch one process per GPU or machine with torchrun (init_method "env://") instead of the
local spawn below; what is reduced is d x d per head (docs/distributed.md), whatever the number of tokens.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kqsvd  # noqa: E402
from llama2c_torch import Llama2c, Tokenizer, calibrate, fit, stories_of  # noqa: E402


def all_reduced(accumulator):
    """The accumulator of every process's tokens: gram and tokens summed, largest magnitudes max-reduced."""
    gram = torch.from_numpy(accumulator.gram)
    tokens = torch.tensor([accumulator.tokens], dtype=torch.float64)
    largest = torch.from_numpy(np.array(accumulator.largest_magnitudes))
    dist.all_reduce(gram, op=dist.ReduceOp.SUM)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    # Summation order can differ in the last bits between the two triangles: symmetrize exactly.
    gram = (gram + gram.T) / 2
    return kqsvd.GramAccumulator.restored(gram.numpy(), int(tokens.item()), largest.numpy())


def reduce_calibration(local):
    """The calibration of all processes, in every process."""
    s = local.shape
    total = kqsvd.ModelCalibration(s)
    for layer in range(s.layers):
        for h in range(s.kv_heads):
            total.merge_keys(layer, h, all_reduced(local.keys(layer, h)))
            total.merge_values(layer, h, all_reduced(local.values(layer, h)))
        for h in range(s.query_heads):
            total.merge_queries(layer, h, all_reduced(local.query_head(layer, h)))
    return total


def worker(rank, world_size, args, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = Llama2c(args.model)
    tokenizer = Tokenizer(args.tokenizer, model.w["embedding"].shape[0])
    first, last = (int(x) for x in args.calib_stories.split(":"))
    stories = stories_of(args.text, first, last, tokenizer, args.max_tokens)
    local = calibrate(model, stories[rank::world_size])  # this process's share
    total = reduce_calibration(local)
    projections = fit(model, total, args.rank)
    if rank == 0:
        if args.out:
            kqsvd.save_projections(args.out, projections, model=os.path.basename(os.path.dirname(args.model)), overwrite=True)
        results.put({"tokens": total.tokens, "local_tokens": local.tokens,
                     "key_spectrum": np.array(projections.keys(0, 0).singular_values),
                     "keys_gram": np.array(total.keys(1, 0).gram), "queries_gram": np.array(total.queries(1, 0).gram)})
    dist.barrier()
    dist.destroy_process_group()


def run(args):
    """Spawns args.world_size processes on this machine; returns rank 0's summary."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    init_file = os.path.abspath(args.init_file or f"/tmp/kqsvd_gloo_{os.getpid()}")
    if os.path.exists(init_file):
        os.remove(init_file)
    processes = [context.Process(target=worker, args=(r, args.world_size, args, init_file, results))
                 for r in range(args.world_size)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    if any(p.exitcode != 0 for p in processes):
        raise SystemExit(f"a process failed: exit codes {[p.exitcode for p in processes]}")
    return results.get()


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--calib-stories", default="0:40")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", help="rank 0 writes the projection file here")
    p.add_argument("--init-file", help="the rendezvous file (default: one in /tmp)")
    return p


if __name__ == "__main__":
    arguments = parser().parse_args()
    summary = run(arguments)
    print(f"{arguments.world_size} processes: {summary['tokens']} calibration tokens per head in all "
          f"({summary['local_tokens']} on rank 0); projections fitted in every process"
          + (f", written to {arguments.out}" if arguments.out else ""))
