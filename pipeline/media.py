"""Image and video files: PNG bytes of one frame, mp4 videos of a frame list (PyAV).

    from pipeline.media import png_bytes, write_video
    write_bytes(Path("a.png"), png_bytes(img))                   # (H, W, 3) uint8
    write_video(Path("ep.mp4"), frames, fps=20, codec="h264")     # published atomically
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
from PIL import Image

ENCODERS = {"h264": "libx264", "av1": "libsvtav1"}


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of one (H, W, 3) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def video_encoder(codec: str) -> str:
    """The FFmpeg encoder name for `codec` ("h264" or "av1"), checked against this PyAV build."""
    if codec not in ENCODERS:
        raise ValueError(f"codec must be one of {sorted(ENCODERS)}, got {codec!r}")
    name = ENCODERS[codec]
    if name not in av.codecs_available:
        raise ValueError(f"PyAV has no {name} encoder for codec {codec!r}")
    return name


def write_video(path: Path, frames: list[np.ndarray], fps: int, codec: str = "h264") -> None:
    """Encode RGB frames as an mp4 (yuv420p, a keyframe every 10 frames, near-lossless), written
    to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner on stderr otherwise
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(video_encoder(codec), rate=fps)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            stream.options = ({"preset": "10", "crf": "18", "g": "10"} if codec == "av1"
                              else {"crf": "10", "g": "10", "threads": "1"})
            for img in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
