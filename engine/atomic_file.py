"""Atomic file output: write to a temporary file next to the target, rename it over the target when done.

A reader never sees a half-written file, and an error leaves nothing behind (nor clobbers an existing
target). The temporary file is created the way ``open(path, "w")`` creates a file, with mode
``0o666`` less the process umask, so the result gets the permissions any file the user creates gets
(``tempfile.mkstemp`` makes it 0600, and that mode survives the rename: a web server or a colleague
could not read the output).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ATTEMPTS = 100


@contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a new empty temporary path in ``path``'s directory; rename it to ``path`` on success.

    The caller writes the temporary path (it may also replace it: its creation mode is put back
    before the rename). On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    for _ in range(_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, set by the kernel
        os.close(fd)
        break
    else:
        raise FileExistsError(f"could not create a temporary file next to {path} in {_ATTEMPTS} attempts")
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors does) may have made it 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
