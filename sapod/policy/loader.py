"""MODEL_NAME to a policy: the embedded ones by name, anything else through transformers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from sapod.config import Config
from sapod.errors import ModelLoadError
from sapod.logs import get_logger
from sapod.policy.base import Policy

SCRIPTED = "sapod:scripted"
TINY = "sapod:tiny"
EMBEDDED = (SCRIPTED, TINY)


def log_progress(what: str) -> Callable[[str, float], None]:
    """A progress callback that logs each stage at 0, 25, 50, 75 and 100 %."""
    log, shown = get_logger(), {}

    def progress(stage: str, fraction: float) -> None:
        quarter = int(fraction * 4)
        if shown.get(stage, -1) < quarter:
            shown[stage] = quarter
            log.info(what, stage=stage, percent=quarter * 25)

    return progress


def load_policy(cfg: Config, system_prompt: str,
                progress: Callable[[str, float], None] | None = None) -> Policy:
    """The policy MODEL_NAME names; slow steps (building sapod:tiny, loading) are logged as they go."""
    t0 = time.monotonic()
    if cfg.model == SCRIPTED:
        from sapod.policy.scripted import ScriptedPolicy

        get_logger().info("model_loaded", model=cfg.model)
        return ScriptedPolicy()
    if cfg.model.startswith("sapod:") and cfg.model not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {cfg.model!r}: use one of {', '.join(EMBEDDED)}")
    import transformers

    from sapod.policy.hf import HFPolicy

    if not sys.stderr.isatty():
        # Download and loading bars are for a person at a terminal; in a log they are noise.
        transformers.utils.logging.disable_progress_bar()
    path = cfg.model
    if cfg.model == TINY:
        from sapod.policy.tiny import ensure_tiny

        try:
            path = str(ensure_tiny(cfg.cache_dir, progress=progress or log_progress("building_tiny")))
        except OSError as exc:
            raise ModelLoadError(f"cannot build sapod:tiny in {cfg.cache_dir}: {exc}") from None
    get_logger().info("model_loading", model=cfg.model, path=path)
    policy = HFPolicy(path, system_prompt=system_prompt, max_new_tokens=cfg.max_new_tokens,
                      learning_rate=cfg.learning_rate, temperature=cfg.temperature,
                      device=None if cfg.device == "auto" else cfg.device, name=cfg.model,
                      compile_generation=cfg.compile_generation)
    get_logger().info("model_loaded", model=cfg.model, path=path, device=str(policy.device),
                      compile_generation=policy.compile_generation,
                      parameters=sum(p.numel() for p in policy.model.parameters()),
                      seconds=round(time.monotonic() - t0, 2))
    if policy.compile_generation and policy.device.type != "cuda":
        # transformers compiles generation on CUDA only; an uncompiled static cache is slower
        get_logger().warning("compile_generation_without_cuda", device=str(policy.device),
                             detail="the static KV cache runs uncompiled here, slower than without it")
    return policy
