"""Links in the data folder must not lead out of it: the one "inside the folder" check.

Everything that reads, copies, zips, lists or writes a user's file or LoRA goes through these:
a path is used only when its real path (every link followed) is inside the folder it was
found in. A link that stays inside stays usable (a dataset linked to another dataset, say);
one that leads elsewhere is refused with the path named. It lives in formats (which imports
nothing from the other packages) so raw-text reading can use it; dispatcher.access.links re-exports it
for the dashboard, the dispatcher and the engine.
"""

from __future__ import annotations

from pathlib import Path

# The longest name of one file or folder most file systems take (bytes; NAME_MAX). Longer
# names are refused by the name checks before any call to the file system could fail.
NAME_MAX = 255


class LeadsOutside(ValueError):
    """A path whose real location is outside the folder it must stay in."""


def inside(path: Path, root: Path) -> bool:
    """Is `path`, links followed, `root` itself or inside it (links in `root` followed too)?"""
    try:
        real = path.resolve()
        base = root.resolve()
    except (OSError, RuntimeError):  # a link loop, or a name the file system refuses
        return False
    return real == base or base in real.parents


def check_inside(path: Path, root: Path, shown: str) -> Path:
    """`path` if it stays inside `root`; LeadsOutside naming `shown` (how the user knows the
    path, like `loras/x/adapter_model.safetensors`) otherwise."""
    if not inside(path, root):
        raise LeadsOutside(f"{shown} is a link that leads outside {root.name}/: refused (only "
                           "links that stay inside the data folder are followed)")
    return path


def too_long(name: str) -> str | None:
    """A message when a name (a relative path) has a part longer than the file system takes."""
    for part in name.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            return (f"is too long ({len(name)} characters; each part of a name may have at "
                    f"most {NAME_MAX} bytes)")
    if len(name) > 4096:
        return f"is too long ({len(name)} characters; at most 4096)"
    return None
