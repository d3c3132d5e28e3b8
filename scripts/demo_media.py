"""Writes a short generated tone for every track of a catalog directory into a bucket
directory, so a local S3-compatible server can serve what the gateway signs.

usage: demo_media.py CATALOG_DIR BUCKET_DIR
"""

import math
import pathlib
import struct
import sys
import tomllib
import wave


def tone(path: pathlib.Path, hz: float, seconds: float = 1.5, rate: int = 22050) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / rate)))
            for i in range(int(seconds * rate))
        )
        w.writeframes(frames)


def main(catalog: str, bucket: str) -> None:
    count = 0
    for file in sorted(pathlib.Path(catalog).glob("*.toml")):
        for i, track in enumerate(tomllib.loads(file.read_text()).get("track", [])):
            tone(pathlib.Path(bucket) / track["key"], 220 * (1 + i / 4))
            count += 1
    print(f"wrote {count} objects under {bucket}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
