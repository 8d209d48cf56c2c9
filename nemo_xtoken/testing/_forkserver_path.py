"""Imported first by :mod:`nemo_xtoken.testing.dist`'s fork server: give it the parent's ``sys.path``.

Python 3.12.1's ``multiprocessing.forkserver.main`` ignores the ``sys_path`` it is handed, so a preloaded test
module (found through a path pytest inserted) failed to import, silently, and every rank imported it again.
"""

import os
import sys

_paths = os.environ.get("XTOKEN_FORKSERVER_SYS_PATH")
if _paths:
    sys.path[:] = _paths.split(os.pathsep)
