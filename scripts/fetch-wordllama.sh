#!/usr/bin/env bash
# Fetch the WordLlama "l2_supercat" 256-d static embeddings for fedmesh-embed.
#
#   scripts/fetch-wordllama.sh [DEST]      (default DEST: <repo>/third_party/wordllama)
#
# Downloads the PyPI wheel wordllama==0.4.0.post1 (MIT licence, ~19 MB) with pip and
# unpacks only the two files the Rust embedder needs:
#   DEST/tokenizers/l2_supercat_tokenizer_config.json
#   DEST/weights/l2_supercat_256.safetensors
# Both are checked against pinned SHA-256 digests. Idempotent: if both files are present
# and intact, nothing is downloaded. Nothing is fetched at run time by fedmesh itself.
set -euo pipefail

VERSION="0.4.0.post1"
TOK="tokenizers/l2_supercat_tokenizer_config.json"
WTS="weights/l2_supercat_256.safetensors"
TOK_SHA="93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68"
WTS_SHA="64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5"

die() { echo "fetch-wordllama: error: $*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/third_party/wordllama}"

sha_ok() { # file expected-digest
  [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

if sha_ok "$DEST/$TOK" "$TOK_SHA" && sha_ok "$DEST/$WTS" "$WTS_SHA"; then
  echo "fetch-wordllama: already present in $DEST"
  exit 0
fi

command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"
mkdir -p "$DEST/tokenizers" "$DEST/weights" 2>/dev/null || die "cannot create $DEST"
PIP=()
if command -v pip3 >/dev/null; then PIP=(pip3)
elif command -v pip >/dev/null; then PIP=(pip)
elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
else die "pip not found: install Python 3 with pip, or download wordllama-$VERSION's wheel by hand"
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-wordllama: downloading wordllama==$VERSION from PyPI ..."
"${PIP[@]}" download --quiet --no-deps --disable-pip-version-check "wordllama==$VERSION" -d "$TMP/dl" \
  || die "pip download wordllama==$VERSION failed (is PyPI reachable? proxy settings?)"
WHEEL="$(find "$TMP/dl" -name 'wordllama-*.whl' | head -n1)"
[[ -n "$WHEEL" ]] || die "pip did not produce a wordllama wheel in $TMP/dl"

# A wheel is a zip; prefer unzip, fall back to Python's zipfile.
mkdir -p "$TMP/x"
if command -v unzip >/dev/null; then
  unzip -q -o "$WHEEL" "wordllama/$TOK" "wordllama/$WTS" -d "$TMP/x" || die "unzip of $WHEEL failed"
else
  python3 - "$WHEEL" "$TMP/x" "wordllama/$TOK" "wordllama/$WTS" <<'PY' || die "extracting $WHEEL failed"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in sys.argv[3:]:
        z.extract(name, sys.argv[2])
PY
fi

sha_ok "$TMP/x/wordllama/$TOK" "$TOK_SHA" || die "checksum mismatch for $TOK"
sha_ok "$TMP/x/wordllama/$WTS" "$WTS_SHA" || die "checksum mismatch for $WTS"

# Copy then rename, so an interrupted run never leaves a truncated file under the final name.
for f in "$TOK" "$WTS"; do
  cp "$TMP/x/wordllama/$f" "$DEST/$f.part" || die "cannot write $DEST/$f"
  mv -f "$DEST/$f.part" "$DEST/$f" || die "cannot write $DEST/$f"
done
echo "fetch-wordllama: installed wordllama $VERSION l2_supercat (256-d) into $DEST"
