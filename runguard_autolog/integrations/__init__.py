"""One module per SDK: a ``PATCHES`` table of targets plus pure functions that read
requests and responses. The shared guarded-call driver lives in ``runguard_autolog._guard``."""
