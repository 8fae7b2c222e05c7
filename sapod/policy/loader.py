"""MODEL_NAME to a policy: the embedded ones by name, anything else through transformers."""

from __future__ import annotations

from collections.abc import Callable

from sapod.config import Config
from sapod.errors import ModelLoadError
from sapod.logs import get_logger
from sapod.policy.base import Policy

SCRIPTED = "sapod:scripted"
TINY = "sapod:tiny"
EMBEDDED = (SCRIPTED, TINY)


def load_policy(cfg: Config, system_prompt: str,
                progress: Callable[[str, float], None] | None = None) -> Policy:
    if cfg.model == SCRIPTED:
        from sapod.policy.scripted import ScriptedPolicy

        get_logger().info("model_loaded", model=cfg.model)
        return ScriptedPolicy()
    if cfg.model.startswith("sapod:") and cfg.model not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {cfg.model!r}: use one of {', '.join(EMBEDDED)}")
    import transformers

    from sapod.policy.hf import HFPolicy

    # Progress bars would interleave with the JSON log lines.
    transformers.utils.logging.disable_progress_bar()
    path = cfg.model
    if cfg.model == TINY:
        from sapod.policy.tiny import ensure_tiny

        try:
            path = str(ensure_tiny(cfg.cache_dir, progress=progress))
        except OSError as exc:
            raise ModelLoadError(f"cannot build sapod:tiny in {cfg.cache_dir}: {exc}") from None
    policy = HFPolicy(path, system_prompt=system_prompt, max_new_tokens=cfg.max_new_tokens,
                      learning_rate=cfg.learning_rate, temperature=cfg.temperature,
                      device=None if cfg.device == "auto" else cfg.device, name=cfg.model)
    get_logger().info("model_loaded", model=cfg.model, path=path, device=str(policy.device),
                      parameters=sum(p.numel() for p in policy.model.parameters()))
    return policy
