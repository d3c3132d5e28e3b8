"""Writes a synthetic catalog for scale measurements: N tracks spread over L libraries.

    python3 scripts/catalog_gen.py DIR --tracks 1000000 [--libraries 10000] [--weighted]

Libraries are `audio.scale-<i>` (one library: `audio.scale-0`); every track is active. Titles
and keys carry spaces and a non-ASCII letter so the load does its real work (JSON-encoding
the title, percent-encoding the key). About 100 bytes per track, as a real catalog entry.
"""

import argparse
import os


def library_name(i):
    return f"audio.scale-{i}"


def write_catalog(out, tracks, libraries=1, weighted=False):
    os.makedirs(out, exist_ok=True)
    per, extra = divmod(tracks, libraries)
    n = 0
    for lib in range(libraries):
        count = per + (1 if lib < extra else 0)
        path = os.path.join(out, library_name(lib) + ".toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f'name = "Scale {lib}"\n')
            chunk = []
            for _ in range(count):
                weight = f"weight = {1 + n % 7}\n" if weighted else ""
                chunk.append(
                    f'\n[[track]]\ntitle = "Track {n} – Süd"\n'
                    f'key = "scale/{lib}/track {n}.mp3"\nduration_sec = {30 + n % 600}\n{weight}'
                )
                n += 1
                if len(chunk) == 10_000:
                    f.write("".join(chunk))
                    chunk.clear()
            f.write("".join(chunk))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--tracks", type=int, required=True)
    ap.add_argument("--libraries", type=int, default=1)
    ap.add_argument("--weighted", action="store_true")
    args = ap.parse_args()
    write_catalog(args.dir, args.tracks, args.libraries, args.weighted)


if __name__ == "__main__":
    main()
