"""Writes a generated tone, a playable 3-second WAV (16-bit mono PCM), for every track of a
catalog directory into a bucket directory, so the local S3-compatible store started by
scripts/run serves what the gateway signs. Each library gets its own pitch.

usage: demo_media.py CATALOG_DIR BUCKET_DIR
"""

import array
import math
import pathlib
import sys
import tomllib
import wave

RATE = 22050
SECONDS = 3


def tone(path: pathlib.Path, hz: float) -> None:
    samples = array.array("h")
    for i in range(RATE * SECONDS):
        fade = min(1.0, i / 2000, (RATE * SECONDS - i) / 2000)  # no click at either end
        samples.append(int(8000 * fade * math.sin(2 * math.pi * hz * i / RATE)))
    if sys.byteorder == "big":
        samples.byteswap()
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())


def main(catalog: str, bucket: str) -> None:
    count = 0
    for n, file in enumerate(sorted(pathlib.Path(catalog).glob("*.toml"))):
        for i, track in enumerate(tomllib.loads(file.read_text()).get("track", [])):
            tone(pathlib.Path(bucket) / track["key"], 220 * (1 + n / 3) * (1 + i / 8))
            count += 1
    print(f"wrote {count} generated tones under {bucket}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
