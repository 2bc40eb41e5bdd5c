#!/usr/bin/env bash
# Shared body of prepare_cc3m.sh / prepare_cc12m.sh: they set NAME and COLUMNS (the official file's column order)
# and source this file with the user's arguments. See either script for usage and the env-overridable knobs.
: "${NAME:?set by the calling script}" "${COLUMNS:?set by the calling script}"
set -euo pipefail

PROCESSES="${PROCESSES:-$(nproc 2>/dev/null || echo 8)}"
THREADS="${THREADS:-64}"
IMAGE_SIZE="${IMAGE_SIZE:-384}"
RESIZE_MODE="${RESIZE_MODE:-keep_ratio}"
RESIZE_ONLY_IF_BIGGER="${RESIZE_ONLY_IF_BIGGER:-True}"
ENCODE_QUALITY="${ENCODE_QUALITY:-95}"
SAMPLES_PER_SHARD="${SAMPLES_PER_SHARD:-10000}"
RETRIES="${RETRIES:-2}"
TIMEOUT="${TIMEOUT:-10}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") TSV OUT_DIR [-- EXTRA_IMG2DATASET_ARGS...]
  TSV      the official ${NAME} file (columns: ${COLUMNS// /<TAB>}; header optional)
  OUT_DIR  output folder for the WebDataset shards (created; re-running resumes)
environment (current value):
  PROCESSES=${PROCESSES} THREADS=${THREADS} IMAGE_SIZE=${IMAGE_SIZE} (256-512)
  RESIZE_MODE=${RESIZE_MODE} (keep_ratio|center_crop|border) RESIZE_ONLY_IF_BIGGER=${RESIZE_ONLY_IF_BIGGER}
  ENCODE_QUALITY=${ENCODE_QUALITY} SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD} RETRIES=${RETRIES} TIMEOUT=${TIMEOUT}
  DRY_RUN=1 prints the img2dataset command instead of running it
EOF
    exit 2
}
die() { echo "error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

[[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && usage
[[ $# -ge 2 ]] || usage
TSV="$1"; OUT="$2"; shift 2
if [[ $# -gt 0 ]]; then
    [[ "$1" == "--" ]] || usage
    shift
fi
[[ -f "$TSV" && -s "$TSV" ]] || die "TSV file not found or empty: $TSV"
for v in PROCESSES THREADS IMAGE_SIZE ENCODE_QUALITY SAMPLES_PER_SHARD RETRIES TIMEOUT; do
    is_int "${!v}" && [[ "${!v}" -gt 0 || "$v" == RETRIES ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ "$IMAGE_SIZE" -ge 256 && "$IMAGE_SIZE" -le 512 ]] || die "IMAGE_SIZE must be within 256-512 (got $IMAGE_SIZE)"
case "$RESIZE_MODE" in keep_ratio|center_crop|border) ;; *) die "RESIZE_MODE must be keep_ratio, center_crop or border";; esac
case "$RESIZE_ONLY_IF_BIGGER" in True|False) ;; *) die "RESIZE_ONLY_IF_BIGGER must be True or False";; esac
if [[ "$DRY_RUN" != 1 ]] && ! command -v img2dataset >/dev/null; then
    die "img2dataset is not installed: pip install img2dataset"
fi

mkdir -p "$OUT"
LIST="$OUT/url_list.tsv"   # the TSV with a header line, as img2dataset expects
HEADER="${COLUMNS// /$'\t'}"
if [[ "$(head -n 1 "$TSV" | tr -d '\r')" == "$HEADER" ]]; then
    cp "$TSV" "$LIST"
else
    { printf '%s\n' "$HEADER"; cat "$TSV"; } > "$LIST"
fi

cmd=(img2dataset --url_list "$LIST" --input_format tsv --url_col url --caption_col caption
     --output_format webdataset --output_folder "$OUT"
     --processes_count "$PROCESSES" --thread_count "$THREADS"
     --image_size "$IMAGE_SIZE" --resize_mode "$RESIZE_MODE" --resize_only_if_bigger "$RESIZE_ONLY_IF_BIGGER"
     --encode_format jpg --encode_quality "$ENCODE_QUALITY" --number_sample_per_shard "$SAMPLES_PER_SHARD"
     --retries "$RETRIES" --timeout "$TIMEOUT" --incremental_mode incremental
     --enable_wandb False "$@")
if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
echo "[$NAME] $(($(wc -l < "$LIST") - 1)) URLs -> $OUT (processes=$PROCESSES threads=$THREADS size=$IMAGE_SIZE $RESIZE_MODE)"
"${cmd[@]}"

# success statistics (img2dataset writes NNNNN_stats.json per shard) -> sizes.json + stats_summary.json
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
total, sizes = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}, {}
for path in sorted(glob.glob(os.path.join(out, "*_stats.json"))):
    with open(path) as f:
        stats = json.load(f)
    shard = os.path.basename(path)[: -len("_stats.json")] + ".tar"
    for k in total:
        total[k] += int(stats.get(k, 0))
    if os.path.exists(os.path.join(out, shard)):
        sizes[shard] = int(stats["successes"])
with open(os.path.join(out, "sizes.json"), "w") as f:
    json.dump(sizes, f, indent=1)
total["shards"] = len(sizes)
total["success_rate"] = round(total["successes"] / max(1, total["count"]), 4)
with open(os.path.join(out, "stats_summary.json"), "w") as f:
    json.dump(total, f, indent=1)
print(json.dumps(total))
if sizes:
    names = sorted(sizes)
    stem = lambda n: n[: -len(".tar")]
    pattern = names[0] if len(names) == 1 else "{" + stem(names[0]) + ".." + stem(names[-1]) + "}.tar"
    print(f"train with: --train-data '{os.path.join(out, pattern)}'  (sizes.json: {total['successes']} samples)")
PY
