"""The image rule the Dockerfile and the pod specs share: a pinned tag, never latest.

An image without a tag, or with :latest, changes under a running fleet; a tag other
than latest, or a digest, does not.
"""

from __future__ import annotations


def pinned(image: str) -> str | None:
    """None when the image names a tag other than latest (or a digest), else why not."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (an implicit :latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the latest tag; pin a version"
    return None
