"""sapod: SAPO swarm RL post-training through a shared folder."""

__version__ = "0.1.0"

PROTOCOL = 1


def get_experiment_progress(shared_root, experiment):
    """Per-node progress of one experiment as a plain dict (see sapod.progress)."""
    from sapod.progress import get_experiment_progress as _impl

    return _impl(shared_root, experiment)
