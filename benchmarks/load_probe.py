"""Where loading a 7B llava-hf checkpoint spends its time: writes a random bf16 llava-1.5-7b (as `run.py`
does) if missing, then times reading the tensors alone, reading plus assembling them into parameters, and the
whole load onto the device, with a cProfile listing of the last.

    python benchmarks/load_probe.py [--dir /tmp/jb/llava-1.5-7b]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import run  # the sibling benchmark script: its checkpoint shapes and writer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/jb/llava-1.5-7b")
    directory = Path(ap.parse_args().dir)
    t = time.perf_counter()
    run.write_checkpoint(directory, "1.5", run.CLIP_VIT_L_336, run.VICUNA_7B, run.build_tokenizer(), "cuda")
    print(json.dumps({"stage": "write", "s": time.perf_counter() - t}), flush=True)
    from jaxvlm import params, sharding
    from jaxvlm.modeling import Llava

    info = params.inspect_checkpoint(directory)
    t = time.perf_counter()
    nbytes = sum(a.nbytes for _, _, a in params.iter_model_tensors(info))
    print(json.dumps({"stage": "read tensors", "s": time.perf_counter() - t, "gb": nbytes / 1e9}), flush=True)
    abstract = nnx.split(nnx.eval_shape(lambda: Llava(info.config, jnp.bfloat16)))[1]
    shapes = {p: v.shape for p, v in nnx.to_flat_state(abstract)}
    t = time.perf_counter()
    for _ in params.mapped_tensors(info, shapes):
        pass
    print(json.dumps({"stage": "read + assemble", "s": time.perf_counter() - t}), flush=True)
    mesh = sharding.make_mesh(1, 1, info.config)
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    model = params.load_model(info, jnp.bfloat16, place=sharding.placer(mesh))
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    profile.disable()
    print(json.dumps({"stage": "load onto the device", "s": time.perf_counter() - t}), flush=True)
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
