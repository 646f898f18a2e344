"""Session fixtures: tiny LLaVA checkpoints built once per test session (see tests/tiny_models.py).

Each fixture returns a `tiny_models.TinyModel` (path, reference_path, fmt, version, layout, image_token_index,
vocab_size, tokenizer_size, tokens_per_image(width, height), ...). Built lazily: a test pays only for what it asks.
Directory names follow the real hub names, so chat-template matching by path behaves as for the real models.

llava-hf (transformers `save_pretrained` + processor; reference_path == path):
- `llava15_hf`                LLaVA-1.5, LLaMA MHA (4 heads), float32, CLIP center-crop processor
- `llava15_hf_gqa`            the same with GQA (4 query / 2 kv heads)
- `llava15_hf_bf16`           LLaVA-1.5 stored in bfloat16 (config dtype bfloat16)
- `llava15_hf_tied`           LLaVA-1.5 with tie_word_embeddings=True (no lm_head tensor in the file)
- `llava15_hf_hub`            LLaVA-1.5 as hub repos look: "hub" key layout, 2 shards, preprocessor_config.json +
                              processor_config.json + chat_template.json
- `llava_next_hf`             LLaVA-NeXT (1.6), LLaMA, pinpoints [[32,64],[64,32],[64,64],[96,32],[32,96]]
- `llava15_hf_layouts`        {layout: TinyModel} for every name in tiny_models.LAYOUTS (same weights as llava15_hf)
- `llava_next_hf_layouts`     the same for llava_next_hf
original haotian-liu/LLaVA (reference_path: the llava-hf twin with the same weights; vision_tower_path: CLIP dir):
- `llava15_original`          1.5: sharded pytorch_model-*.bin, tower in a separate CLIP dir (pytorch_model.bin)
- `llava16_original`          1.6 vicuna: sharded safetensors, tower inside, anyres + spatial_unpad
- `llava16_mistral_original`  1.6 mistral (LlavaMistralForCausalLM, GQA, rope_theta 1e6)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

# The tests run toy programs, where LLVM's optimisations cost more compile time than they save at run time: on
# the CPU the suite takes about a quarter less without them. Only where JAX can find no GPU or TPU plugin, so that
# tests on an accelerator compile as users' programs do. Subprocesses inherit the flags.
if not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu")):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                     "--xla_llvm_disable_expensive_passes=true"]))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny_models` from any test module

import tiny_models  # noqa: E402

# One persistent XLA compilation cache (and demo-model cache) per test session: pipelines of the same tiny model
# compile identical programs, which then load from disk instead of compiling again.
os.environ.setdefault("JAXVLM_CACHE_DIR", tempfile.mkdtemp(prefix="jaxvlm-test-cache-"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def llava15_hf(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_hf(tiny_root / "llava-1.5-tiny-hf")


@pytest.fixture(scope="session")
def llava15_hf_gqa(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_hf(tiny_root / "llava-1.5-tiny-gqa-hf", text="gqa", seed=1)


@pytest.fixture(scope="session")
def llava15_hf_bf16(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_hf(tiny_root / "llava-1.5-tiny-bf16-hf", dtype="bfloat16", seed=2)


@pytest.fixture(scope="session")
def llava15_hf_tied(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_hf(tiny_root / "llava-1.5-tiny-tied-hf", tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="session")
def llava15_hf_hub(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_hf(tiny_root / "llava-1.5-tiny-hub-hf", layout="hub", shards=2,
                                     processor_style="hub", seed=4)


@pytest.fixture(scope="session")
def llava_next_hf(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_hf(tiny_root / "llava-v1.6-vicuna-tiny-hf", next=True, seed=5)


@pytest.fixture(scope="session")
def llava15_hf_layouts(tiny_root, llava15_hf) -> dict[str, tiny_models.TinyModel]:
    return {lay: tiny_models.write_layout(llava15_hf, tiny_root / f"llava-1.5-tiny-{lay}-hf", lay)
            for lay in tiny_models.LAYOUTS}


@pytest.fixture(scope="session")
def llava_next_hf_layouts(tiny_root, llava_next_hf) -> dict[str, tiny_models.TinyModel]:
    return {lay: tiny_models.write_layout(llava_next_hf, tiny_root / f"llava-v1.6-vicuna-tiny-{lay}-hf", lay)
            for lay in tiny_models.LAYOUTS}


@pytest.fixture(scope="session")
def llava15_original(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_original(tiny_root / "llava-v1.5-tiny", "1.5", seed=10)


@pytest.fixture(scope="session")
def llava16_original(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_original(tiny_root / "llava-v1.6-vicuna-tiny", "1.6", seed=11)


@pytest.fixture(scope="session")
def llava16_mistral_original(tiny_root) -> tiny_models.TinyModel:
    return tiny_models.make_llava_original(tiny_root / "llava-v1.6-mistral-tiny", "1.6", llm="mistral", seed=12)
