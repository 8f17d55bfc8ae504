#!/usr/bin/env bash
# synth_keywords.sh: make a spoken-keyword data set offline, in the Speech Commands layout, for
# megalodon-audio (crate megalodon-audio, module dataset).
#
# Usage: scripts/synth_keywords.sh [OUT_DIR] [--words w1,w2,...] [--per-word N] [--seed S]
#                               [--jobs J] [--noise-seconds SEC]
#   OUT_DIR          default data/speech (relative to the current directory)
#   --words          default: the ten Speech Commands keywords yes,no,up,down,left,right,on,off,stop,go
#   --per-word       clips per word, default 300
#   --seed           seed of every random choice (voice, speed, pitch, onset, gain), default 1
#   --jobs           parallel workers, default: number of CPUs
#   --noise-seconds  length of each background-noise file, default 60
#
# Where the data comes from. Google Speech Commands cannot be downloaded here and is not in
# Debian, and no PyPI package was found that ships real keyword recordings for offline use, so
# the recordings are synthesised with Debian packages:
#   * espeak-ng 1.51 (GPL-3.0-or-later): 8 English dialects (en, en-us, en-us-nyc, en-gb-x-rp,
#     en-gb-scotland, en-gb-x-gbclan, en-gb-x-gbcwmd, en-029) x 13 voice variants (the default
#     and 12 of espeak-ng's !v variants: m1 m3 m5 m7 f1 f2 f4 klatt adam Andrea Alicia grandma)
#     = 104 "speakers";
#   * flite 2.2 (BSD-style, some files GPL-2; Debian package "flite"): voices kal, kal16, awb,
#     rms, slt, each at 3 fundamental-frequency settings = 15 "speakers";
#   * sox 14.4 (GPL-2+/LGPL-2.1+): resampling, silence trimming, onset, gain, noise.
# Each clip draws a speaking rate and pitch at random. The generated WAVs are outputs of
# these programs, not copies of a recorded corpus; they carry no licence of their own beyond
# the programs' terms (treat them as freely usable test data). They are NOT natural speech:
# accuracy on them says little about real recordings.
#
# Output (never committed: OUT_DIR/.gitignore ignores everything in it):
#   OUT_DIR/<word>/<speaker>_<n>.wav     16 kHz, mono, 16-bit, exactly 1 s
#   OUT_DIR/_background_noise_/*.wav     white, pink and brown noise, hum, "running tap"
#   OUT_DIR/validation_list.txt          clips of about 10 % of the speakers
#   OUT_DIR/testing_list.txt             clips of another 10 % of the speakers
# Speakers (voice settings) are kept apart between train, validation and test, so validation
# and test accuracy are held-out-voice accuracy. Re-running with the same options gives the
# same set (same voices, rates, pitches and onsets; espeak-ng/flite/sox are deterministic).
set -euo pipefail

OUT=data/speech
WORDS=yes,no,up,down,left,right,on,off,stop,go
PER_WORD=300
SEED=1
JOBS=$(nproc 2>/dev/null || echo 2)
NOISE_SECONDS=60
while [ $# -gt 0 ]; do
  case "$1" in
    --words) WORDS=$2; shift 2 ;;
    --per-word) PER_WORD=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --noise-seconds) NOISE_SECONDS=$2; shift 2 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
case "$PER_WORD$SEED$JOBS$NOISE_SECONDS" in
  *[!0-9]*) echo "--per-word, --seed, --jobs and --noise-seconds take whole numbers" >&2; exit 2 ;;
esac
[ "$PER_WORD" -gt 0 ] && [ "$JOBS" -gt 0 ] || { echo "--per-word and --jobs must be > 0" >&2; exit 2; }
case "$WORDS" in
  *[!a-zA-Z,\ -]*|"") echo "--words: comma-separated words of letters only" >&2; exit 2 ;;
esac

# --- tools --------------------------------------------------------------------------------
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v flite >/dev/null || need+=(flite)
command -v sox >/dev/null || need+=(sox)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]} (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
  else
    echo "missing ${need[*]}: install them (apt-get install ${need[*]})" >&2; exit 1
  fi
fi

start=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
printf '*\n' > "$OUT/.gitignore"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- speakers -----------------------------------------------------------------------------
# One line per speaker: id engine voice variant-or-f0
{
  for d in en en-us en-us-nyc en-gb-x-rp en-gb-scotland en-gb-x-gbclan en-gb-x-gbcwmd en-029; do
    for v in default m1 m3 m5 m7 f1 f2 f4 klatt adam Andrea Alicia grandma; do
      echo "es-$d-$v espeak $d $v"
    done
  done
  for v in kal kal16 awb rms slt; do
    for f0 in lo mid hi; do echo "fl-$v-$f0 flite $v $f0"; done
  done
} > "$TMP/speakers"
# Keep only the espeak-ng variants that exist in this installation.
espeak-ng --voices=variant | awk 'NR > 1 { sub("^!v/", "", $5); print $5 }' > "$TMP/variants"
while read -r id eng voice var; do
  if [ "$eng" = espeak ] && [ "$var" != default ] && ! grep -qx "$var" "$TMP/variants"; then
    continue
  fi
  echo "$id $eng $voice $var"
done < "$TMP/speakers" > "$TMP/speakers.ok"
NSPK=$(wc -l < "$TMP/speakers.ok")

# --- jobs: one line per clip, all random draws made here from the seed ---------------------
# fields: word n speaker engine voice var rate pitch onset_frac gain_db noise_kind noise_db split
awk -v seed="$SEED" -v words="$WORDS" -v per="$PER_WORD" -v nspk="$NSPK" '
  BEGIN { srand(seed) }
  { spk[NR-1] = $0 }
  END {
    # Seeded speaker order: first 10% test, next 10% validation.
    for (i = 0; i < nspk; i++) ord[i] = i
    for (i = nspk - 1; i > 0; i--) { j = int(rand() * (i + 1)); t = ord[i]; ord[i] = ord[j]; ord[j] = t }
    ntest = int(nspk / 10 + 0.5); nval = ntest
    for (i = 0; i < nspk; i++) split_of[ord[i]] = (i < ntest) ? "test" : (i < ntest + nval) ? "val" : "train"
    nw = split(words, w, ",")
    for (k = 1; k <= nw; k++) {
      for (n = 0; n < per; n++) {
        s = int(rand() * nspk)
        rate = int(130 + rand() * 90)      # espeak words per minute / flite stretch
        pitch = int(20 + rand() * 60)      # espeak pitch 0..99
        onset = rand()
        gain = -12 + rand() * 10           # dB
        r = rand(); nk = (r < 0.3) ? "none" : (r < 0.55) ? "whitenoise" : (r < 0.8) ? "pinknoise" : "brownnoise"
        ndb = -45 + rand() * 20            # noise level dB re full scale
        printf "%s %d %s %d %d %.4f %.2f %s %.1f %s\n", w[k], n, spk[s], rate, pitch, onset, gain, nk, ndb, split_of[s]
      }
    }
  }' "$TMP/speakers.ok" > "$TMP/jobs"

make_clip() {
  # $1: job line; writes OUT/word/speaker_n.wav and prints "split relpath" on success
  set -- $1
  local word=$1 n=$2 spk=$3 eng=$4 voice=$5 var=$6 rate=$7 pitch=$8 onset=$9 gain=${10} nk=${11} ndb=${12} split=${13}
  local raw="$TMP/$spk-$word-$n.raw.wav" trim="$TMP/$spk-$word-$n.trim.wav"
  local rel="$word/${spk}_$(printf %04d "$n").wav"
  if [ "$eng" = espeak ]; then
    local v=$voice; [ "$var" != default ] && v="$voice+$var"
    espeak-ng -v "$v" -s "$rate" -p "$pitch" -w "$raw" "$word" 2>/dev/null || return 0
  else
    local f0; case "$var" in lo) f0=$((85 + pitch / 2));; mid) f0=$((120 + pitch));; *) f0=$((170 + pitch));; esac
    local stretch; stretch=$(awk -v r="$rate" 'BEGIN { printf "%.2f", 175 / r }')
    flite -voice "$voice" --setf duration_stretch="$stretch" --setf int_f0_target_mean="$f0" -t "$word" -o "$raw" 2>/dev/null || return 0
  fi
  # 16 kHz mono 16-bit, leading and trailing silence removed
  sox -q "$raw" -r 16000 -c 1 -b 16 "$trim" silence 1 0.01 0.3% reverse silence 1 0.01 0.3% reverse 2>/dev/null || return 0
  local dur; dur=$(soxi -D "$trim" 2>/dev/null || echo 0)
  local pad; pad=$(awk -v d="$dur" -v o="$onset" 'BEGIN { s = 0.98 - d; if (s < 0) s = 0; printf "%.4f", o * s }')
  mkdir -p "$OUT/$word"
  local sig="$TMP/$spk-$word-$n.sig.wav" noi="$TMP/$spk-$word-$n.noise.wav"
  sox -q "$trim" "$sig" pad "$pad" 1 trim 0 1 gain "$gain" 2>/dev/null || return 0
  if [ "$nk" = none ]; then
    mv "$sig" "$OUT/$rel"
  else
    # low-level noise under the word (mixed at unit volume: sox -m would halve both)
    sox -q -n -r 16000 -c 1 -b 16 "$noi" synth 1 "$nk" gain "$ndb" 2>/dev/null || return 0
    sox -q -m -v 1 "$sig" -v 1 "$noi" -b 16 "$OUT/$rel" trim 0 1 2>/dev/null || return 0
    rm -f "$sig" "$noi"
  fi
  rm -f "$raw" "$trim"
  echo "$split $rel"
}
export -f make_clip
export OUT TMP

echo "synthesising $(wc -l < "$TMP/jobs") clips of $(echo "$WORDS" | tr ',' '\n' | wc -l) words from $NSPK speakers with $JOBS jobs into $OUT"
tr '\n' '\0' < "$TMP/jobs" | xargs -0 -n 1 -P "$JOBS" bash -c 'make_clip "$1"' _ > "$TMP/done"

grep '^val ' "$TMP/done" | cut -d' ' -f2 | sort > "$OUT/validation_list.txt"
grep '^test ' "$TMP/done" | cut -d' ' -f2 | sort > "$OUT/testing_list.txt"

# --- background noise (like Speech Commands' _background_noise_) ---------------------------
NOISE="$OUT/_background_noise_"
mkdir -p "$NOISE"
S=$NOISE_SECONDS
sox -q -n -r 16000 -c 1 -b 16 "$NOISE/white_noise.wav" synth "$S" whitenoise gain -12
sox -q -n -r 16000 -c 1 -b 16 "$NOISE/pink_noise.wav" synth "$S" pinknoise gain -10
sox -q -n -r 16000 -c 1 -b 16 "$NOISE/brown_noise.wav" synth "$S" brownnoise gain -8
# mains hum: 50 Hz and harmonics over faint pink noise
sox -q -n -r 16000 -c 1 -b 16 "$NOISE/hum.wav" synth "$S" sine 50 sine 100 sine 150 pinknoise \
  remix - gain -15
# "running tap": band-passed white noise with a slow random-looking tremolo
sox -q -n -r 16000 -c 1 -b 16 "$NOISE/running_tap.wav" synth "$S" whitenoise \
  bandpass 2500 1.5q tremolo 3 40 gain -6

cat > "$OUT/SOURCE.txt" <<EOF
Synthesised by scripts/synth_keywords.sh (seed $SEED, $PER_WORD clips per word) with espeak-ng,
flite and sox from Debian; see the header of that script for the licences. Not natural speech.
EOF

ok=$(wc -l < "$TMP/done")
total=$(wc -l < "$TMP/jobs")
echo "done in $(( $(date +%s) - start )) s: $ok of $total clips written ($(du -sh "$OUT" | cut -f1))"
for w in $(echo "$WORDS" | tr ',' ' '); do
  printf '  %-8s %4d clips\n' "$w" "$(find "$OUT/$w" -name '*.wav' 2>/dev/null | wc -l)"
done
echo "  split: train $(grep -c '^train ' "$TMP/done" || true), validation $(wc -l < "$OUT/validation_list.txt"), test $(wc -l < "$OUT/testing_list.txt")"
echo "  background noise: $(ls "$NOISE" | wc -l) files of $S s"
