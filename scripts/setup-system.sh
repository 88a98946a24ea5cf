#!/usr/bin/env bash
# System pieces the Python packages cannot bring: WordNet for NLTK's METEOR (Debian packages, copied into an
# NLTK data folder inside the venv) and Java for pycocoevalcap (already on these machines).
# Idempotent; needs root (or sudo) only the first time, for apt-get.
set -euo pipefail
VENV=${1:-.venv}
NLTK_DIR="$VENV/nltk_data/corpora/wordnet"
if [ ! -f "$NLTK_DIR/lexnames" ]; then
  if [ ! -d /usr/share/wordnet ] || [ ! -f /usr/share/wordnet/index.sense ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null
  fi
  mkdir -p "$NLTK_DIR"
  find -L /usr/share/wordnet -maxdepth 1 -type f -exec cp -L {} "$NLTK_DIR/" \;
  # NLTK's reader wants `lexnames` (lexicographer file names, fixed list from WordNet 3.0's lexnames file).
  python3 - "$NLTK_DIR/lexnames" <<'PY'
import sys
names = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
pos = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
with open(sys.argv[1], "w") as fh:
    for i, n in enumerate(names):
        fh.write(f"{i:02d}\t{n}\t{pos[n.split('.')[0]]}\n")
PY
fi
echo "setup-system: WordNet at $NLTK_DIR"
