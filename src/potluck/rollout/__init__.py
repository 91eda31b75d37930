"""Model versions and their rollout: the registry (register, promote, canary, rollback,
audit log) and ``potluck models``."""
