#!/usr/bin/env bash
# Builds two corpora no run of this project was tuned on, as JSONL {"client": ..., "text": ...} in
# $1 (default: ~/.cache/fleetune-data), for `benchmarks/personalization.py --kind NAME=CORPUS`:
# English fortune-cookie files by topic (Debian's fortunes, fortunes-min) and the Perl manual by
# page (perl-doc's PODs: technical English in another markup). Like make_mixed_corpus.sh, from
# `apt-get download` (no root needed). Prints the two JSONL paths.
set -eu
dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetune-data}; mkdir -p "$dest"
fortunes="$dest/fortunes-en.jsonl"; perldoc="$dest/perldoc.jsonl"
if [ ! -s "$fortunes" ] || [ ! -s "$perldoc" ]; then
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
  pkgs="fortunes fortunes-min perl-doc"
  apt-get download $pkgs >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 || true; apt-get download $pkgs >/dev/null; }
  for deb in ./*.deb; do dpkg-deb -x "$deb" x; done
  python3 - "$fortunes" "$perldoc" x <<'PY'
import glob, json, os, sys
fortunes, perldoc, root = sys.argv[1:]
def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{path}: {len(rows)} texts, {len({r['client'] for r in rows})} clients", file=sys.stderr)
rows = []
base = os.path.join(root, "usr/share/games/fortunes")
for name in sorted(os.listdir(base)):
    path = os.path.join(base, name)
    if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
        continue
    for entry in open(path, encoding="utf-8", errors="replace").read().split("\n%\n"):
        if len(entry.strip()) > 20:
            rows.append({"client": f"fortunes-en/{name}", "text": entry.strip()})
write(fortunes, rows)
rows = []
for path in sorted(glob.glob(os.path.join(root, "usr/share/perl/*/pod/*.pod"))):
    page = os.path.basename(path).removesuffix(".pod")
    for para in open(path, encoding="utf-8", errors="replace").read().split("\n\n"):
        para = para.strip()
        if len(para) > 80 and not para.startswith("=for "):
            rows.append({"client": f"perldoc/{page}", "text": para})
write(perldoc, rows)
PY
fi
echo "$fortunes"; echo "$perldoc"
