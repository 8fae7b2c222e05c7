"""Loading a transformers causal LM for ``HFPolicy``: the model and tokenizer by hub id or
folder, a checkpoint's weights, and the errors a user is shown when either fails.

torch and transformers are imported here: workers alone import this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sapod.errors import ModelLoadError

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_error(name: str, exc: Exception) -> ModelLoadError:
    if not Path(name).exists() and _HUB_ID.fullmatch(name) and isinstance(exc, OSError):
        # transformers turns offline mode, no network and unknown repos all into OSError
        return ModelLoadError(
            f"cannot load model {name!r}: not a local directory, and the Hugging Face hub is "
            "offline, unreachable or has no such model; use MODEL_NAME=sapod:tiny or a local "
            f"model directory ({one_line(exc)[:200]})"
        )
    return ModelLoadError(f"cannot load model {name!r}: {type(exc).__name__}: {one_line(exc)[:300]}")


def load_pretrained(name: str) -> tuple[Any, Any]:
    """``(tokenizer, model)``: the model in fp32 (master weights for Adam) on the CPU, the
    tokenizer set to pad and truncate on the left. Anything that cannot serve is a
    ModelLoadError saying why."""
    try:
        tok = AutoTokenizer.from_pretrained(name)
        # transformers 5 would otherwise load the checkpoint's dtype
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except Exception as exc:
        raise load_error(name, exc) from exc
    if not tok("Answer: 42", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer for a folder without tokenizer files
        raise ModelLoadError(f"cannot load model {name!r}: its tokenizer encodes text to no tokens "
                             "(no tokenizer files? save the tokenizer next to the model)")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"cannot load model {name!r}: tokenizer has neither pad nor eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends to the right end of every row
    tok.truncation_side = "left"  # keep the end of an over-long prompt, next to the answer
    return tok, model


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """A ``save_pretrained`` folder's safetensors (sharded or not) into ``model``; a
    ModelLoadError if they do not match it."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(directory / f))  # cpu; load_state_dict copies onto the device
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied copies (GPT-2's lm_head.weight); those share storage
    # with a loaded tensor and are therefore restored too
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    bad = [k for k in missing if current[k].data_ptr() not in loaded] + list(unexpected)
    if bad:
        raise ModelLoadError(f"checkpoint {directory} does not match the model: {', '.join(bad[:5])}")


@contextlib.contextmanager
def padding_warning_off():
    """Silence "We strongly recommend passing in an `attention_mask`..." during generate.

    generate leaves out an all-ones attention mask on decode steps, and a sampled EOS that
    is also the pad token then looks like padding to the model's check. The mask we pass
    is right; the warning would only be noise on the node's output.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
