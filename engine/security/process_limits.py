"""Process-wide settings `raftka serve` makes before it opens anything.

- The soft limit on open descriptors is raised to the hard limit: every
  connection and every partition's files take descriptors, and the default
  soft limit (often 1024) is reached long before the machine's.
- The file mode mask becomes 077, so the data directory and every file a
  broker creates in it are readable by its own user only (0700 / 0600):
  records, offsets and metadata are the cluster's data, not the host's.
"""
from __future__ import annotations

import logging
import os
import resource
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, error)
    return soft


def make_private(data_dir: Path) -> None:
    """Files created from now on are 0600 and directories 0700; `data_dir`
    itself (created if missing) is made 0700."""
    os.umask(PRIVATE_UMASK)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
